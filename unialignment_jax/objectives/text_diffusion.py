"""Masked discrete text diffusion (MDLM, continuous time, SUBS), as the official
`TextMaskedDiffusionLoss` (docs/method.md "Text masked diffusion"; identical to Dual Diffusion's and MDLM's).

  * log-linear noise, eps = 1e-3: `sigma(t) = -log1p(-(1 - eps) t)`, `sigma'(t) = (1 - eps) /
    (1 - (1 - eps) t)`; a token is masked with probability `1 - exp(-sigma(t)) = (1 - eps) t`;
  * antithetic (stratified) t over the batch: `t_i = eps + (1 - eps) ((U_i / n + i / n) mod 1)`.
    The official (and MDLM) code draws one uniform per example (`torch.rand(n)`), so each of the n
    strata [i/n, (i+1)/n) gets exactly one t with its own jitter; `shared_uniform=True` uses one U
    for the whole batch (a systematic sample). Both cover each stratum once;
  * SUBS: the mask logit gets -1e6 (the official's finite "-infinity"), log-softmax; unmasked
    positions copy their token and contribute exactly zero loss;
  * weight `sigma'(t) / expm1(sigma(t))` (= 1/t exactly; kept in the official form);
  * the sum of weighted NLLs over (B, L) divided by B*L (official: padding included,
    `ignore_padding=False`), or by the number of scored non-padding positions (option "tokens").

VQA: positions before `prefix_len` (the question) are never masked and never scored (the official
`label_mask` path of Dual Diffusion's SFT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_TOKEN_ID = 32099  # T5 <extra_id_0>
NOISE_EPS = 1e-3  # LogLinearNoise eps
SAMPLING_EPS = 1e-3  # training.sampling_eps
NEG_INFINITY = -1_000_000.0  # the official SUBS "-infinity"
NORMALIZATIONS = ("all", "tokens")


def log_linear_noise(t: jax.Array, eps: float = NOISE_EPS) -> tuple[jax.Array, jax.Array]:
    """(sigma(t), sigma'(t)) of the log-linear schedule: total noise and its rate."""
    t = t.astype(jnp.float32)
    sigma = -jnp.log1p(-(1.0 - eps) * t)
    dsigma = (1.0 - eps) / (1.0 - (1.0 - eps) * t)
    return sigma, dsigma


def mask_probability(t: jax.Array, eps: float = NOISE_EPS) -> jax.Array:
    """The official `move_chance = 1 - exp(-sigma(t))` (= (1 - eps) t)."""
    sigma, _ = log_linear_noise(t, eps)
    return 1.0 - jnp.exp(-sigma)


def loss_weight(t: jax.Array, eps: float = NOISE_EPS) -> jax.Array:
    """The official ELBO weight `sigma'(t) / expm1(sigma(t))`, which equals 1/t."""
    sigma, dsigma = log_linear_noise(t, eps)
    return dsigma / jnp.expm1(sigma)


def stratified_t(u: jax.Array, sampling_eps: float = SAMPLING_EPS, group_size: int | None = None) -> jax.Array:
    """Antithetic t from uniforms u (n,) (or one shared uniform broadcast to (n,)).

    `t_i = eps + (1 - eps) ((u_i / g + (i mod g) / g) mod 1)` with g = n, or g = `group_size` for
    strata within consecutive groups (the official's per-GPU micro-batch of 4).
    """
    n = u.shape[0]
    g = n if group_size is None else int(group_size)
    if g < 1 or n % g:
        raise ValueError(f"antithetic group size {g} does not divide the batch {n}")
    offset = (jnp.arange(n) % g).astype(jnp.float32) / g
    unit = jnp.mod(u.astype(jnp.float32) / g + offset, 1.0)
    return (1.0 - sampling_eps) * unit + sampling_eps


def sample_t(rng: jax.Array, n: int, *, sampling_eps: float = SAMPLING_EPS, antithetic: bool = True,
             shared_uniform: bool = False, group_size: int | None = None) -> jax.Array:
    """(n,) float32 diffusion times in [sampling_eps, 1]."""
    if not antithetic:
        return (1.0 - sampling_eps) * jax.random.uniform(rng, (n,), jnp.float32) + sampling_eps
    u = jax.random.uniform(rng, (1,) if shared_uniform else (n,), jnp.float32)
    return stratified_t(jnp.broadcast_to(u, (n,)), sampling_eps, group_size)


def given_positions(length: int, prefix_len: jax.Array | None) -> jax.Array | None:
    """(B, L) bool: the positions before `prefix_len` (never masked, never scored), or None."""
    if prefix_len is None:
        return None
    return jnp.arange(length)[None, :] < prefix_len.astype(jnp.int32)[:, None]


def mask_from_uniform(u: jax.Array, t: jax.Array, *, eps: float = NOISE_EPS,
                      prefix_len: jax.Array | None = None) -> jax.Array:
    """(B, L) bool mask `u < move_chance(t)`, with the VQA prefix never masked."""
    masked = u < mask_probability(t, eps)[:, None]
    given = given_positions(u.shape[1], prefix_len)
    return masked if given is None else masked & ~given


def sample_mask(rng: jax.Array, shape: tuple[int, int], t: jax.Array, *, eps: float = NOISE_EPS,
                prefix_len: jax.Array | None = None) -> jax.Array:
    return mask_from_uniform(jax.random.uniform(rng, shape, jnp.float32), t, eps=eps, prefix_len=prefix_len)


def apply_mask(x0: jax.Array, masked: jax.Array, mask_id: int = MASK_TOKEN_ID) -> jax.Array:
    """x_t: the mask id where `masked`, the clean token elsewhere."""
    return jnp.where(masked, jnp.asarray(mask_id, x0.dtype), x0)


def non_padding_mask(ids: jax.Array, eos_id: int = 1, pad_id: int | None = 0) -> jax.Array:
    """(B, L) bool: the tokens up to and including the first EOS (what the tokenizer's attention
    mask marks when the pad token is EOS), and not `pad_id`."""
    is_eos = ids == eos_id
    valid = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
    if pad_id is not None:
        valid &= ids != pad_id
    return valid


def subs_log_probs(logits: jax.Array, xt: jax.Array, mask_id: int = MASK_TOKEN_ID) -> jax.Array:
    """The full SUBS log-probabilities (B, L, V), as the official `_subs_parameterization`.

    Used by samplers and the reference tests; the loss below gathers the one entry it needs
    without building the rewritten (B, L, V) tensor.
    """
    vocab = jnp.arange(logits.shape[-1])
    logits = jnp.where(vocab == mask_id, logits.astype(jnp.float32) + NEG_INFINITY, logits.astype(jnp.float32))
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    unmasked = (xt != mask_id)[..., None]
    copy = jnp.where(vocab == xt[..., None], 0.0, NEG_INFINITY)
    return jnp.where(unmasked, copy, logp)


def text_diffusion_loss(logits: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array, *,
                        mask_id: int = MASK_TOKEN_ID, eps: float = NOISE_EPS,
                        normalize: str = "all", valid: jax.Array | None = None,
                        prefix_len: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MDLM SUBS loss of text logits (B, L, V) for clean tokens x0 and noisy tokens xt (B, L).

    normalize "all" (official): sum / (B*L), padding included. "tokens": sum / number of scored
    positions, i.e. `valid` (default: `non_padding_mask(x0)`) minus the VQA prefix.
    Positions before `prefix_len` contribute zero (they are never masked; the mask makes that
    explicit even if a caller masked them).

    Returns (scalar, {"masked_fraction", "nll_masked": mean unweighted NLL over masked positions}).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"text loss normalization {normalize!r}; known: {', '.join(NORMALIZATIONS)}")
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1])
    # SUBS: the mask token can never be the clean token.
    logits = jnp.where(vocab == mask_id, logits + NEG_INFINITY, logits)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # One-hot select rather than a gather: a reduction over the vocabulary axis partitions cleanly
    # when the logits are sharded over it (tensor parallelism), a gather would all-gather them.
    logit_x0 = jnp.sum(jnp.where(vocab == x0[..., None], logits, 0.0), axis=-1)
    # Unmasked positions copy x_t (= x0): log p = 0 exactly, hence zero loss.
    is_masked = xt == mask_id
    given = given_positions(x0.shape[1], prefix_len)
    scored = is_masked if given is None else is_masked & ~given
    nll = jnp.where(scored, lse - logit_x0, 0.0)
    weighted = nll * loss_weight(t, eps)[:, None]
    if normalize == "all":
        count = jnp.float32(x0.shape[0] * x0.shape[1])
    else:
        valid = non_padding_mask(x0) if valid is None else valid
        if given is not None:
            valid = valid & ~given
        weighted = jnp.where(valid, weighted, 0.0)
        count = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)
    loss = jnp.sum(weighted) / count
    n_scored = jnp.sum(scored).astype(jnp.float32)
    metrics = {
        "masked_fraction": jnp.mean(is_masked.astype(jnp.float32)),
        "nll_masked": jax.lax.stop_gradient(jnp.sum(nll) / jnp.maximum(n_scored, 1.0)),
    }
    return loss, metrics
