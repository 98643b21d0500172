"""The dual-stream objective of one task batch (docs/method.md "Losses", `train.py`'s micro-step).

Two passes of the same DiT per example:
  * image pass (t2i, edit, perception, compose): the noisy target latent x_sigma, the prompt (or
    instruction) features with 10% CFG dropout, the clean condition latents (edit/perception: 1,
    compose: K) appended after the target tokens, timestep 1000 sigma. Gives the flow-matching
    term, the pooled final image features (contrastive) and the image adapter's output (alignment);
  * text pass (every batch with `caption_ids`): the clean target latent at timestep 0, and the
    masked caption re-encoded by the frozen text encoder. No condition image, even for edit
    batches (as the official code). Gives the masked-diffusion term, the pooled final text features
    and the text adapter's output.

    L = w_image L_img + w_text L_txt + w_contrastive L_con + w_align_image L_aI + w_align_text L_aT

with the official weights 1, 0.2, 0.05, 0.1, 0.1 (`configs/config_unify.py`). Weights are static
Python floats: a term with weight 0 is not computed at all, and a pass that no active term needs is
not run (checked when tracing: Python-level branching), as is the adapter tap when its alignment
term is off. Caption/VQA batches have no image pass (no `prompt_ids`), so they train only the text
term and the text alignment.

Randomness: every draw (sigma, flow noise, CFG dropout, text t, token masks) comes from `rng` via
`draw_randomness`, one fixed sub-key per use, so the step is a deterministic function of
(rng, batch) and switching a term off does not change the other draws. The draws are per-example
arrays with a leading batch axis: a trainer doing gradient accumulation can draw them once for the
whole batch and slice them with the batch (`draws=`), which makes the accumulated step equal to the
big-batch step (antithetic t strata then span the whole batch).

The frozen text encoder is any callable `encode_text(ids (B, L) int32) -> (B, L, context_dim)`;
its output is wrapped in `jax.lax.stop_gradient` (the official runs T5 under no_grad).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from unialignment_jax import tasks as tasks_lib
from unialignment_jax.objectives import alignment, contrastive, flow_matching, text_diffusion
from unialignment_jax.parallel.rules import constrain

TERMS = ("image", "text", "contrastive", "align_image", "align_text")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Per-stage weights of the five terms (official defaults). 0 switches a term off."""

    image: float = 1.0
    text: float = 0.2
    contrastive: float = 0.05
    align_image: float = 0.1
    align_text: float = 0.1

    def __post_init__(self):
        for name in TERMS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"loss weight {name} = {value!r}: weights are non-negative numbers")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "LossWeights":
        unknown = sorted(set(values) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown loss weight {unknown[0]!r}; terms: {', '.join(TERMS)}")
        return cls(**{k: float(v) for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
    """Everything about the terms that is not a weight. Defaults are the official recipe."""

    flow_loss: str = "x0"  # "x0" (official, sigma^2-weighted velocity MSE) | "velocity"
    timestep_shift: float = 1.0  # SD3 shift applied to the training sigmas (official: 1)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_dropout: float = flow_matching.CFG_DROPOUT_P
    text_noise_eps: float = text_diffusion.NOISE_EPS
    text_sampling_eps: float = text_diffusion.SAMPLING_EPS
    antithetic: bool = True
    antithetic_shared_uniform: bool = False  # official: one uniform per example (stratified jitter)
    antithetic_group_size: int | None = None  # None: strata over the batch; 4: the official micro-batch
    text_normalize: str = "all"  # "all" (official: B*L, padding included) | "tokens"
    contrastive_temperature: float = contrastive.TEMPERATURE
    contrastive_group_size: int | None = None  # None: global-batch negatives; 4: the official micro-batch
    eos_id: int = 1
    pad_id: int = 0
    # False (official): the text encoder is frozen, its outputs get stop_gradient. True lets
    # gradients into `encode_text`'s outputs, for a trainer that trains part of the encoder (e.g.
    # T5's mask-token row, `text_encoder.train_mask_embedding`); not the official recipe.
    text_encoder_gradient: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ObjectiveOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown objective option {unknown[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**dict(values))

    def __post_init__(self):
        if self.flow_loss not in flow_matching.FLOW_LOSS_MODES:
            raise ValueError(f"flow_loss {self.flow_loss!r}; known: {', '.join(flow_matching.FLOW_LOSS_MODES)}")
        if self.text_normalize not in text_diffusion.NORMALIZATIONS:
            raise ValueError(f"text_normalize {self.text_normalize!r}; known: "
                             f"{', '.join(text_diffusion.NORMALIZATIONS)}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout = {self.cfg_dropout}: a probability in [0, 1]")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift = {self.timestep_shift}: must be positive")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature = {self.contrastive_temperature}: must be positive")
        for name in ("antithetic_group_size", "contrastive_group_size"):
            g = getattr(self, name)
            if g is not None and (not isinstance(g, int) or g < 1):
                raise ValueError(f"{name} = {g!r}: None or a positive integer")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one task batch computes, decided at trace time from the task, batch keys and weights."""

    terms: tuple[str, ...]
    image_pass: bool
    text_pass: bool
    image_tap: bool
    text_tap: bool


def make_plan(task: str, batch: Mapping[str, Any], weights: LossWeights = LossWeights()) -> Plan:
    """The active terms and passes; raises ValueError on a batch that lacks what a term needs."""
    tasks_lib.check_task(task)
    has_image = task in tasks_lib.IMAGE_PASS_TASKS
    has_text = "caption_ids" in batch
    if "target_latents" not in batch:
        raise ValueError(f"{task} batch: no 'target_latents' (the trainer encodes 'target' pixels with the "
                         "codec before calling the objective)")
    if has_image and "prompt_ids" not in batch:
        raise ValueError(f"{task} batch: no 'prompt_ids' for the image pass")
    if has_image and task in tasks_lib.CONDITION_TASKS and "cond_latents" not in batch:
        raise ValueError(f"{task} batch: no 'cond_latents' (condition latents)")
    if not has_text and task in ("caption", "vqa"):
        raise ValueError(f"{task} batch: no 'caption_ids'")
    available = {
        "image": has_image,
        "text": has_text,
        "contrastive": has_image and has_text,
        "align_image": has_image,
        "align_text": has_text,
    }
    terms = tuple(t for t in TERMS if available[t] and getattr(weights, t) != 0)
    for term, key in (("align_image", "teacher_image"), ("align_text", "teacher_text")):
        if term in terms and key not in batch:
            raise ValueError(f"{task} batch: no {key!r} for the {term} term (set its loss weight to 0 "
                             "to train without teacher features)")
    if not terms:
        raise ValueError(f"{task} batch: every loss term is switched off or unavailable (weights {weights})")
    return Plan(
        terms=terms,
        image_pass=any(t in terms for t in ("image", "contrastive", "align_image")),
        text_pass=any(t in terms for t in ("text", "contrastive", "align_text")),
        image_tap="align_image" in terms,
        text_tap="align_text" in terms,
    )


# ----------------------------------------------------------------------------------- randomness

_DRAW_KEYS = ("sigma", "noise", "cfg_drop", "text_t", "text_mask")


def draw_randomness(rng: jax.Array, batch: Mapping[str, Any], *, task: str,
                    options: ObjectiveOptions = ObjectiveOptions()) -> dict[str, jax.Array]:
    """Every random draw of one batch, per example (leading batch axis), from fixed sub-keys of rng.

    Image pass (task with an image pass): `sigma` (B,), `noise` (like target_latents), `cfg_drop`
    (B,) bool. Text pass (batch with caption_ids): `text_t` (B,), `text_mask` (B, L) bool (the VQA
    prefix is never masked).
    """
    keys = dict(zip(_DRAW_KEYS, jax.random.split(rng, len(_DRAW_KEYS))))
    out: dict[str, jax.Array] = {}
    if task in tasks_lib.IMAGE_PASS_TASKS:
        x0 = batch["target_latents"]
        b = x0.shape[0]
        out["sigma"] = constrain(flow_matching.sample_sigmas(
            keys["sigma"], b, options.timestep_shift, logit_mean=options.logit_mean,
            logit_std=options.logit_std), ("act_batch",))
        out["noise"] = constrain(jax.random.normal(keys["noise"], x0.shape, jnp.float32),
                                 ("act_batch",) + (None,) * (x0.ndim - 1))
        out["cfg_drop"] = constrain(flow_matching.cfg_drop_mask(keys["cfg_drop"], b, options.cfg_dropout),
                                    ("act_batch",))
    if "caption_ids" in batch:
        ids = batch["caption_ids"]
        t = text_diffusion.sample_t(keys["text_t"], ids.shape[0], sampling_eps=options.text_sampling_eps,
                                    antithetic=options.antithetic,
                                    shared_uniform=options.antithetic_shared_uniform,
                                    group_size=options.antithetic_group_size)
        out["text_t"] = constrain(t, ("act_batch",))
        out["text_mask"] = constrain(text_diffusion.sample_mask(
            keys["text_mask"], ids.shape, t, eps=options.text_noise_eps, prefix_len=batch.get("prefix_len")),
            ("act_batch", None))
    return out


# ------------------------------------------------------------------------------------ objective


def dual_stream_loss(
    model: Callable[..., dict[str, jax.Array]],
    encode_text: Callable[[jax.Array], jax.Array],
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None,
    *,
    task: str,
    null_features: jax.Array | None = None,
    mask_id: int = text_diffusion.MASK_TOKEN_ID,
    weights: LossWeights = LossWeights(),
    options: ObjectiveOptions = ObjectiveOptions(),
    draws: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The UniAlignment training objective of one task batch.

    Args:
      model: the `UniAlignmentDiT` (or anything with its call signature
        `model(latents, context, timesteps, cond_latents=None, *, tap=False) -> dict`).
      encode_text: the frozen text encoder, `ids (B, L) -> (B, L, context_dim)`; its output gets
        `stop_gradient` (unless `options.text_encoder_gradient`).
      batch: one task's batch in the format of `unialignment_jax.tasks` with latents
        (`target_latents`, `cond_latents`), token ids, `prefix_len` (vqa), teacher features.
      rng: a PRNG key; all draws come from it (unused when `draws` is given).
      task: the batch's task (static).
      null_features: (L, D) / (1, L, D) text-encoder features of the empty prompt, computed once;
        needed when the image pass runs with `options.cfg_dropout > 0`.
      mask_id: the text mask token id (T5 `<extra_id_0>` = 32099).
      weights, options: static; see `LossWeights`, `ObjectiveOptions`.
      draws: precomputed `draw_randomness(...)` output (e.g. drawn for the whole batch and sliced
        per micro-batch).

    Returns (total, metrics): float32 scalars `loss` (the weighted total) and `loss/<term>` for every
    computed term, plus diagnostics (`image/velocity_mse`, `text/masked_fraction`, `text/nll_masked`,
    `contrastive/accuracy`, `align_image/cosine`, `align_text/cosine`) of the computed terms.
    """
    plan = make_plan(task, batch, weights)
    if plan.image_pass and options.cfg_dropout > 0 and null_features is None:
        raise ValueError("CFG dropout needs null_features (the empty prompt's encoder features)")
    if draws is None:
        if rng is None:
            raise ValueError("dual_stream_loss needs an rng key or precomputed draws")
        draws = draw_randomness(rng, batch, task=task, options=options)
    frozen = (lambda x: x) if options.text_encoder_gradient else jax.lax.stop_gradient
    x0 = batch["target_latents"].astype(jnp.float32)
    b = x0.shape[0]
    terms: dict[str, jax.Array] = {}
    metrics: dict[str, jax.Array] = {}

    def record(term, value_and_metrics):
        value, extra = value_and_metrics
        terms[term] = value
        metrics.update({f"{term}/{k}": v for k, v in extra.items()})

    image_out = text_out = None
    if plan.image_pass:
        prompt = frozen(encode_text(batch["prompt_ids"]))
        if options.cfg_dropout > 0:
            prompt = flow_matching.apply_cfg_dropout(prompt, jax.lax.stop_gradient(null_features),
                                                     draws["cfg_drop"])
        sigma, noise = draws["sigma"], draws["noise"]
        x_sigma = flow_matching.noisy_latents(x0, noise, sigma)
        cond = batch["cond_latents"] if task in tasks_lib.CONDITION_TASKS else None
        image_out = model(x_sigma, prompt, flow_matching.model_timesteps(sigma), cond, tap=plan.image_tap)
        if "image" in plan.terms:
            record("image", flow_matching.image_flow_loss(image_out["velocity"], x0, noise, sigma,
                                                          options.flow_loss))
        if "align_image" in plan.terms:
            record("align_image", alignment.cosine_alignment_loss(image_out["tap_image"], batch["teacher_image"]))

    if plan.text_pass:
        ids = batch["caption_ids"]
        xt = text_diffusion.apply_mask(ids, draws["text_mask"], mask_id)
        context = frozen(encode_text(xt))
        # Clean target latent at timestep 0, no condition image (official text pass).
        text_out = model(x0, context, jnp.zeros((b,), jnp.float32), None, tap=plan.text_tap)
        if "text" in plan.terms:
            valid = None
            if options.text_normalize == "tokens":
                valid = text_diffusion.non_padding_mask(ids, options.eos_id, options.pad_id)
            record("text", text_diffusion.text_diffusion_loss(
                text_out["text_logits"], ids, xt, draws["text_t"], mask_id=mask_id, eps=options.text_noise_eps,
                normalize=options.text_normalize, valid=valid, prefix_len=batch.get("prefix_len")))
        if "align_text" in plan.terms:
            record("align_text", alignment.cosine_alignment_loss(text_out["tap_text"], batch["teacher_text"]))

    if "contrastive" in plan.terms:
        record("contrastive", contrastive.symmetric_info_nce(
            image_out["image_hidden"], text_out["text_hidden"], temperature=options.contrastive_temperature,
            group_size=options.contrastive_group_size))

    total = sum(jnp.float32(getattr(weights, t)) * terms[t] for t in plan.terms)
    out = {"loss": total.astype(jnp.float32)}
    out.update({f"loss/{t}": terms[t].astype(jnp.float32) for t in plan.terms})
    out.update({k: v.astype(jnp.float32) for k, v in metrics.items()})
    return out["loss"], out
