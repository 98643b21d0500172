"""The dual-stream objective with a tiny DiT and a tiny frozen T5 (issue 4, item 5).

* every term and the total equal the official formulas (tests/official_losses.py) applied to the
  same model passes, and the passes are fed exactly what the official code feeds them;
* gradients reach the DiT blocks, both heads and both adapters, and none reaches the text encoder;
* a term with weight 0 is not computed (model calls and taps counted at trace time; the lowered
  step's HLO FLOPs);
* the step is a deterministic function of (rng, batch), on one device or on an 8-device mesh.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tests.conftest import make_mesh
from unialignment_jax.models import create
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
from unialignment_jax.models.t5 import T5Config, T5Encoder
from unialignment_jax.objectives import unified
from unialignment_jax.objectives.unified import LossWeights, ObjectiveOptions, dual_stream_loss
from unialignment_jax.parallel import rules as rules_lib

MASK_ID = 63
VOCAB = 64
LENGTH = 8
DIT = DiTConfig(num_layers=2, num_heads=2, head_dim=8, patch_size=2, in_channels=4, out_channels=4,
                sample_size=8, pos_embed_max_size=12, context_dim=16, vocab_size=VOCAB, timestep_dim=16,
                block_depth=1, adapter_hidden=12, adapter_out=10)
T5 = T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=VOCAB, mask_token_id=MASK_ID,
              dtype="float32", param_dtype="float32")
TOL = dict(rtol=1e-5, atol=1e-5)


def t_(x):
    import torch

    return torch.from_numpy(np.array(x))


def random_model(make, seed, scale=0.3):
    """Build from abstract shapes and fill every parameter with N(0, scale^2) values from numpy.

    Random values everywhere (the AdaLN gates and the image projection start at zero, which would
    hide the gradient paths through the blocks); no JAX init is compiled (keeps the test fast).
    """
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(make))
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray((scale * rng.standard_normal(x.shape)).astype(x.dtype)) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


@pytest.fixture(scope="module")
def models():
    dit = random_model(lambda: UniAlignmentDiT(DIT, rngs=nnx.Rngs(0)), 1)
    t5 = random_model(lambda: T5Encoder(T5, rngs=nnx.Rngs(0)), 2)
    return dit, t5


def make_batch(task, b=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda: np.concatenate([rng.integers(3, 60, (b, LENGTH - 3)), np.ones((b, 3), np.int64)], 1)
    batch = {
        "target_latents": rng.standard_normal((b, 4, 4, 4)).astype(np.float32),
        "caption_ids": ids().astype(np.int32),
        "prefix_len": np.zeros((b,), np.int32),
        "teacher_image": rng.standard_normal((b, DIT.adapter_out)).astype(np.float32),
        "teacher_text": rng.standard_normal((b, DIT.adapter_out)).astype(np.float32),
    }
    if task in ("t2i", "edit", "perception", "compose"):
        batch["prompt_ids"] = ids().astype(np.int32)
    k = {"edit": 1, "perception": 1, "compose": 3}.get(task, 0)
    if k:
        batch["cond_latents"] = rng.standard_normal((b, k, 4, 4, 4)).astype(np.float32)
    if task == "vqa":
        batch["prefix_len"] = (np.arange(b) % 5).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def null_features(t5):
    return t5(jnp.ones((1, LENGTH), jnp.int32))  # the empty prompt: EOS-padded


class Recorder:
    """Wraps a model or encoder: counts calls and records their arguments and outputs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


# Tiny shapes: XLA:CPU compile time dominates these tests; LLVM -O0 halves it (same float semantics).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fast(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


_JITTED = {}


def recorded_step(models, task):
    """jit((rng, batch) -> (total, metrics, draws, what each model/encoder call got and gave, null)).

    The objective draws from rng itself; `draw_randomness(rng)` is returned next to it so that the
    reference can be fed the same draws. One compile per task, shared by several tests.
    """
    if task not in _JITTED:
        dit, t5 = models
        gd, gp = nnx.split(dit)
        td, tp = nnx.split(t5)

        def fn(params, t5_params, batch, rng):
            model, encoder = Recorder(nnx.merge(gd, params)), Recorder(nnx.merge(td, t5_params))
            null = null_features(encoder.fn)
            total, metrics = dual_stream_loss(model, encoder, batch, rng, task=task, null_features=null,
                                              mask_id=MASK_ID)
            draws = unified.draw_randomness(rng, batch, task=task)
            calls = [(args, out) for args, _, out in model.calls]
            encoded = [(args[0], out) for args, _, out in encoder.calls]
            return total, metrics, draws, calls, encoded, null

        compiled = {}

        def call(batch, rng):
            args = (gp, tp, batch, rng)
            key = tuple((x.shape, str(x.sharding)) for x in jax.tree.leaves(args))
            if key not in compiled:
                compiled[key] = compile_fast(fn, *args)
            return compiled[key](*args)

        _JITTED[task] = call
    return _JITTED[task]


def rng_with_mixed_cfg_dropout(batch, task):
    draw = jax.jit(lambda r: unified.draw_randomness(r, batch, task=task)["cfg_drop"])
    for seed in range(100):
        drop = np.asarray(draw(jax.random.key(seed)))
        if drop.any() and not drop.all():
            return jax.random.key(seed)
    raise AssertionError("no seed with mixed CFG dropout")


# ----------------------------------------------------------------------------- official parity


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_terms_and_passes_match_official(models, task):
    pytest.importorskip("torch")
    from tests import official_losses as official

    dit, t5 = models
    batch = make_batch(task)
    rng = rng_with_mixed_cfg_dropout(batch, task)
    total, metrics, draws, calls, encoded, null = recorded_step(models, task)(batch, rng)
    assert len(calls) == 2 and len(encoded) == 2
    (img_args, img_out), (txt_args, txt_out) = calls
    b = batch["target_latents"].shape[0]

    # --- what the image pass was fed (ImageFlowMatchingLoss[_edit].compute_loss)
    x0, noise, sigma = (t_(batch["target_latents"]), t_(draws["noise"]), t_(draws["sigma"]))
    np.testing.assert_allclose(np.asarray(img_args[0]), official.flow_noisy_input(x0, noise, sigma).numpy(), **TOL)
    np.testing.assert_array_equal(np.asarray(img_args[2]), np.asarray(draws["sigma"]) * 1000)
    np.testing.assert_array_equal(np.asarray(encoded[0][0]), np.asarray(batch["prompt_ids"]))
    prompt = t_(encoded[0][1])
    drop_u = t_(np.where(np.asarray(draws["cfg_drop"]), 0.0, 0.5).astype(np.float32))
    np.testing.assert_allclose(np.asarray(img_args[1]), official.cfg_dropout(prompt, t_(null), drop_u).numpy(), **TOL)
    if task == "edit":
        np.testing.assert_array_equal(np.asarray(img_args[3]), np.asarray(batch["cond_latents"]))
    else:
        assert img_args[3] is None

    # --- what the text pass was fed (TextMaskedDiffusionLoss._forward_pass_diffusion)
    x0_ids, t = t_(batch["caption_ids"]).long(), t_(draws["text_t"])
    xt = np.where(np.asarray(draws["text_mask"]), MASK_ID, np.asarray(batch["caption_ids"]))
    assert 0 < np.mean(xt == MASK_ID) < 1
    np.testing.assert_array_equal(np.asarray(encoded[1][0]), xt)  # the masked caption is re-encoded
    np.testing.assert_array_equal(np.asarray(txt_args[1]), np.asarray(encoded[1][1]))
    np.testing.assert_array_equal(np.asarray(txt_args[0]), np.asarray(batch["target_latents"]))  # clean target
    np.testing.assert_array_equal(np.asarray(txt_args[2]), np.zeros(b))  # timestep 0
    assert txt_args[3] is None  # no condition image, even for edit

    # --- the terms, by the official formulas on the same pass outputs
    o = {k: t_(v) for k, v in img_out.items()}
    p = {k: t_(v) for k, v in txt_out.items()}
    ref = {
        "image": official.flow_loss(o["velocity"], x0, noise, sigma),
        "text": official.text_loss(p["text_logits"], x0_ids, t_(xt).long(), t, mask_index=MASK_ID),
        "contrastive": official.contrastive(o["image_hidden"], p["text_hidden"]),
        "align_image": official.cosine_similarity_loss(o["tap_image"], t_(batch["teacher_image"])),
        "align_text": official.cosine_similarity_loss(p["tap_text"], t_(batch["teacher_text"])),
    }
    for term, value in ref.items():
        np.testing.assert_allclose(float(metrics[f"loss/{term}"]), float(value), **TOL, err_msg=term)
    ref_total = official.total_loss(ref["image"], ref["text"], ref["contrastive"], ref["align_text"],
                                    ref["align_image"])
    np.testing.assert_allclose(float(total), float(ref_total), **TOL)
    assert float(metrics["loss"]) == float(total)
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


# ------------------------------------------------------------------------------------- gradients


def test_gradients_reach_dit_heads_adapters_and_not_the_text_encoder(models):
    dit, t5 = models
    batch = make_batch("edit")
    gd, gp = nnx.split(dit)
    td, tp = nnx.split(t5)

    def loss(params, t5_params, options=ObjectiveOptions(), weights=LossWeights()):
        encoder = nnx.merge(td, t5_params)
        return dual_stream_loss(nnx.merge(gd, params), encoder, batch, jax.random.key(0), task="edit",
                                null_features=null_features(encoder), mask_id=MASK_ID, options=options,
                                weights=weights)[0]

    def grads(params, t5_params):
        frozen = jax.grad(loss, argnums=(0, 1))(params, t5_params)
        # Control: with text_encoder_gradient=True gradients do reach the encoder, so the zeros
        # above come from the stop_gradient, not from a disconnected encoder (same weights: XLA shares
        # the forward pass of the two, which compiles faster than a smaller second graph).
        opened = jax.grad(loss, argnums=1)(params, t5_params, ObjectiveOptions(text_encoder_gradient=True))
        return frozen, opened

    (g_dit, g_t5), g_open = compile_fast(grads, gp, tp)(gp, tp)
    norms = _norms(g_dit)
    groups = {
        "blocks (image stream)": "blocks/img/", "blocks (text stream)": "blocks/txt/",
        "image head": "image_proj_out", "image head norm": "image_norm_out", "text head": "text_proj_out",
        "image adapter": "adapter_img/", "text adapter": "adapter_txt/", "context embedder": "context_embedder",
        "timestep MLP": "time_embed_", "patch embed": "patch_embed",
    }
    for name, key in groups.items():
        found = {k: v for k, v in norms.items() if key in k}
        assert found and all(v > 0 for v in found.values()), (name, found)
    t5_norms = _norms(g_t5)
    assert t5_norms and all(v == 0.0 for v in t5_norms.values()), t5_norms
    assert sum(_norms(g_open).values()) > 0


def _norms(grads):
    """{path: L2 norm} of every leaf of a gradient State."""
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): float(np.linalg.norm(np.ravel(v)))
            for path, v in leaves}


# ----------------------------------------------------------------------------- skipped terms


def _trace(models, task, weights, batch):
    """Trace (no execution): (tap flag of each model call, number of encoder calls, metric names)."""
    dit, t5 = models
    model, encoder = Recorder(dit), Recorder(t5)
    _, metrics = jax.eval_shape(lambda r: dual_stream_loss(model, encoder, batch, r, task=task,
                                                           null_features=null_features(t5), mask_id=MASK_ID,
                                                           weights=weights), jax.random.key(0))
    return [kw["tap"] for _, kw, _ in model.calls], len(encoder.calls), set(metrics)


@pytest.mark.parametrize("task,weights,taps,encoder_calls,terms", [
    ("t2i", LossWeights(), [True, True], 2, unified.TERMS),
    ("t2i", LossWeights(text=0, contrastive=0, align_text=0), [True], 1, ("image", "align_image")),
    ("edit", LossWeights(align_image=0, align_text=0), [False, False], 2, ("image", "text", "contrastive")),
    ("t2i", LossWeights(image=0, contrastive=0, align_image=0), [True], 1, ("text", "align_text")),
    ("t2i", LossWeights(text=0, align_text=0), [True, False], 2, ("image", "contrastive", "align_image")),
    ("caption", LossWeights(), [True], 1, ("text", "align_text")),
    ("vqa", LossWeights(align_text=0), [False], 1, ("text",)),
    ("compose", LossWeights(contrastive=0, text=0, align_text=0, align_image=0), [False], 1, ("image",)),
    ("t2i/no caption", LossWeights(), [True], 1, ("image", "align_image")),
])
def test_zero_weight_removes_the_computation(models, task, weights, taps, encoder_calls, terms):
    """Model passes (and adapter taps) and encoder calls counted at trace time."""
    task, _, variant = task.partition("/")
    batch = make_batch(task)
    if variant == "no caption":  # a batch without a caption has no text pass
        batch = {k: v for k, v in batch.items() if k not in ("caption_ids", "teacher_text")}
    calls, n_encoder, keys = _trace(models, task, weights, batch)
    assert calls == taps
    assert n_encoder == encoder_calls
    assert {k for k in keys if k.startswith("loss/")} == {f"loss/{t}" for t in terms}


def test_zero_text_weights_cut_flops(models):
    dit, t5 = models
    batch = make_batch("t2i")
    gd, gp = nnx.split(dit)
    null = null_features(t5)

    def flops(weights):
        fn = jax.jit(lambda p, r: dual_stream_loss(nnx.merge(gd, p), t5, batch, r, task="t2i", null_features=null,
                                                   mask_id=MASK_ID, weights=weights)[0])
        cost = fn.lower(gp, jax.random.key(0)).cost_analysis()  # XLA's HLO cost analysis, before compiling
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    full = flops(LossWeights())
    image_only = flops(LossWeights(text=0, contrastive=0, align_text=0, align_image=0))
    # The text pass (a DiT forward with the vocabulary head, plus a T5 encode) is gone.
    assert 0 < image_only < 0.7 * full, (image_only, full)


# ------------------------------------------------------------------------- determinism, errors


def test_deterministic_given_rng_and_batch(models):
    batch = make_batch("t2i")
    step = recorded_step(models, "t2i")
    a, b, c = (step(batch, jax.random.key(k))[1] for k in (3, 3, 4))
    assert all(float(a[k]) == float(b[k]) for k in a)
    assert float(a["loss/image"]) != float(c["loss/image"]) and float(a["loss/text"]) != float(c["loss/text"])
    # one fixed sub-key per use: the text draws do not depend on whether an image pass exists
    draw = jax.jit(unified.draw_randomness, static_argnames="task")
    d_t2i = draw(jax.random.key(3), batch, task="t2i")
    d_cap = draw(jax.random.key(3), make_batch("caption"), task="caption")
    assert set(d_t2i) == {"sigma", "noise", "cfg_drop", "text_t", "text_mask"}
    assert set(d_cap) == {"text_t", "text_mask"}
    np.testing.assert_array_equal(np.asarray(d_t2i["text_t"]), np.asarray(d_cap["text_t"]))
    np.testing.assert_array_equal(np.asarray(d_t2i["text_mask"]), np.asarray(d_cap["text_mask"]))


def test_vqa_prefix_is_given(models):
    dit, t5 = models
    batch = make_batch("vqa")
    draw = jax.jit(unified.draw_randomness, static_argnames=("task", "options"))
    draws = draw(jax.random.key(0), batch, task="vqa",
                 options=ObjectiveOptions(text_sampling_eps=0.99))  # t ~ 1: mask nearly all
    given = np.arange(LENGTH)[None] < np.asarray(batch["prefix_len"])[:, None]
    mask = np.asarray(draws["text_mask"])
    assert given.any() and not mask[given].any() and mask[~given].mean() > 0.9
    gd, gp = nnx.split(dit)
    fn = lambda p: dual_stream_loss(nnx.merge(gd, p), t5, batch, None, task="vqa", mask_id=MASK_ID, draws=draws)
    total, metrics = compile_fast(fn, gp)(gp)
    assert np.isfinite(float(total)) and {k for k in metrics if k.startswith("loss/")} == {"loss/text", "loss/align_text"}


def test_bad_batches_are_clear_errors(models):
    dit, t5 = models
    run = lambda batch, task, **kw: dual_stream_loss(dit, t5, batch, jax.random.key(0), task=task, mask_id=MASK_ID,
                                                     **{"null_features": jnp.zeros((LENGTH, T5.d_model)), **kw})
    edit = make_batch("edit")
    with pytest.raises(ValueError, match="cond_latents"):
        run({k: v for k, v in edit.items() if k != "cond_latents"}, "edit")
    with pytest.raises(ValueError, match="teacher_image"):
        run({k: v for k, v in edit.items() if k != "teacher_image"}, "edit")
    with pytest.raises(ValueError, match="target_latents"):
        run({k: v for k, v in edit.items() if k != "target_latents"}, "edit")
    with pytest.raises(ValueError, match="prompt_ids"):
        run({k: v for k, v in edit.items() if k != "prompt_ids"}, "edit")
    with pytest.raises(ValueError, match="null_features"):
        run(edit, "edit", null_features=None)
    with pytest.raises(ValueError, match="unknown task"):
        run(edit, "edits")
    with pytest.raises(ValueError, match="switched off"):
        run(make_batch("caption"), "caption", weights=LossWeights(text=0, align_text=0))
    with pytest.raises(ValueError, match="unknown loss weight"):
        LossWeights.from_mapping({"caption": 0.2})
    assert LossWeights.from_mapping({"text": 1.0}) == dataclasses.replace(LossWeights(), text=1.0)
    with pytest.raises(ValueError, match="flow_loss"):
        ObjectiveOptions(flow_loss="eps")
    with pytest.raises(ValueError, match="unknown objective option"):
        ObjectiveOptions.from_mapping({"temperature": 0.1})
    assert ObjectiveOptions.from_mapping({"contrastive_group_size": 4}).contrastive_group_size == 4
    with pytest.raises(ValueError, match="non-negative"):
        LossWeights(text=-1.0)


# ----------------------------------------------------------------------------- sharded step


def test_sharded_objective_equals_single_device(models):
    """The objective jitted on 8 simulated devices (batch over data x fsdp, fsdp rules) equals the
    single-device value: the draws are generated sharded yet identical (partitionable threefry)."""
    batch = make_batch("edit", seed=5)
    step = recorded_step(models, "edit")
    single = step(batch, jax.random.key(11))[1]
    mesh = make_mesh(2, 4, 1)
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with create.sharding_context(mesh, rules_lib.get_rules("fsdp")):
        sharded = step(jax.tree.map(shard, batch), jax.random.key(11))[1]
        jax.block_until_ready(sharded)
    for k in single:
        np.testing.assert_allclose(float(sharded[k]), float(single[k]), rtol=2e-5, atol=2e-6, err_msg=k)
