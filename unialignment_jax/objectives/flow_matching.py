"""Image flow matching (rectified flow, SD3 style), as the official `ImageFlowMatchingLoss`
(docs/method.md, "Image flow matching").

The official recipe, piece by piece:
  * sigma: `u = sigmoid(N(0, 1))` (logit-normal), `idx = floor(1000 u)`, `sigma = (1000 - idx) / 1000`,
    i.e. a draw from diffusers' `FlowMatchEulerDiscreteScheduler()` table (1000 training steps,
    shift 1: the SD3 shift-3 scheduler is deliberately *not* used for training). An optional
    `shift` applies SD3's `sigma' = shift sigma / (1 + (shift - 1) sigma)` to the grid (default 1 =
    official);
  * noising: `x_sigma = (1 - sigma) x0 + sigma noise`; the model's timestep input is `1000 sigma`;
  * loss: the model predicts a velocity v; the official loss reconstructs `x0_hat = x_sigma - sigma v`
    and takes `mean_b mean_chw (x0_hat - x0)^2` (weighting 1: `compute_loss_weighting_for_sd3
    ('logit_normal')` returns ones). That is `sigma^2 |v - (noise - x0)|^2`, a sigma^2-weighted
    velocity MSE (mode "x0", the default). Mode "velocity" is the plain velocity MSE (an option,
    not the official objective);
  * classifier-free-guidance dropout: with probability 0.1 per example the prompt features are
    replaced by the features of the empty prompt (the official uses T5(" ") padded to 256 with EOS).
    Condition images are never dropped.

Everything here is a pure function of arrays; randomness comes in as a key or as explicit draws.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
CFG_DROPOUT_P = 0.1
FLOW_LOSS_MODES = ("x0", "velocity")


@functools.lru_cache(maxsize=None)
def sigma_table(shift: float = 1.0) -> np.ndarray:
    """The scheduler's training sigmas, index 0 = sigma 1.0 ... index 999 = sigma 0.001 (float32).

    Built with the same float32 operations as diffusers' `FlowMatchEulerDiscreteScheduler`
    (integer timesteps 1000..1 divided by 1000, then the shift), so that a lookup is bit-identical
    to the official draw. XLA would turn `x / 1000` into `x * 0.001`, which is off by an ulp.
    """
    n = NUM_TRAIN_TIMESTEPS
    timesteps = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    sigmas = timesteps / np.float32(n)
    if shift != 1.0:
        shift = np.float32(shift)
        sigmas = shift * sigmas / (np.float32(1.0) + (shift - np.float32(1.0)) * sigmas)
    return sigmas.astype(np.float32)


def sigmas_from_uniform(u: jax.Array, shift: float = 1.0) -> jax.Array:
    """Map u in [0, 1] onto the scheduler's 1/1000 grid: `sigma = (1000 - floor(1000 u)) / 1000`,
    then the optional shift. Values in {0.001, ..., 1.0} (shift 1).

    The index is clipped to 999 so that u == 1 (a float32 sigmoid of a large normal draw) maps to
    the smallest sigma instead of falling off the table (the official code would fail there).
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be positive, got {shift}")
    n = NUM_TRAIN_TIMESTEPS
    idx = jnp.clip(jnp.floor(u.astype(jnp.float32) * n).astype(jnp.int32), 0, n - 1)
    return jnp.asarray(sigma_table(float(shift)))[idx]


def sample_sigmas(rng: jax.Array, batch: int, shift: float = 1.0, *, logit_mean: float = 0.0,
                  logit_std: float = 1.0) -> jax.Array:
    """(batch,) float32 sigmas: logit-normal u on the 1/1000 grid, then the optional shift."""
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    return sigmas_from_uniform(u, shift)


def model_timesteps(sigma: jax.Array) -> jax.Array:
    """The model's timestep input, `1000 sigma` (the scheduler's `timesteps`)."""
    return sigma.astype(jnp.float32) * jnp.float32(NUM_TRAIN_TIMESTEPS)


def _expand(sigma: jax.Array, like: jax.Array) -> jax.Array:
    return sigma.astype(jnp.float32).reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))


def noisy_latents(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """`x_sigma = (1 - sigma) x0 + sigma noise`, sigma (B,) broadcast over the latent axes."""
    s = _expand(sigma, x0)
    return (1.0 - s) * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """d x_sigma / d sigma = noise - x0."""
    return noise.astype(jnp.float32) - x0.astype(jnp.float32)


def image_flow_loss(velocity: jax.Array, x0: jax.Array, noise: jax.Array, sigma: jax.Array,
                    mode: str = "x0") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss for a predicted velocity (B, ...) of the target x0 under (noise, sigma).

    mode "x0" (official): `mean_b mean((x_sigma - sigma v - x0)^2)`, computed through the same
    x_sigma as the model input, as the official code does (= sigma^2-weighted velocity MSE).
    mode "velocity": `mean_b mean((v - (noise - x0))^2)`.

    Returns (scalar loss, {"velocity_mse": unweighted velocity MSE}).
    """
    if mode not in FLOW_LOSS_MODES:
        raise ValueError(f"flow-matching loss mode {mode!r}; known: {', '.join(FLOW_LOSS_MODES)}")
    v = velocity.astype(jnp.float32)
    x0 = x0.astype(jnp.float32)
    b = x0.shape[0]
    vel_err = (v - velocity_target(x0, noise)).reshape(b, -1)
    velocity_mse = jnp.mean(jnp.mean(vel_err**2, axis=1))
    if mode == "x0":
        s = _expand(sigma, x0)
        x0_hat = v * (-s) + noisy_latents(x0, noise, sigma)
        loss = jnp.mean(jnp.mean(((x0_hat - x0) ** 2).reshape(b, -1), axis=1))
    else:
        loss = velocity_mse
    return loss, {"velocity_mse": jax.lax.stop_gradient(velocity_mse)}


# --------------------------------------------------------------------------------- CFG dropout


def cfg_drop_mask(rng: jax.Array, batch: int, p: float = CFG_DROPOUT_P) -> jax.Array:
    """(batch,) bool: which examples lose their prompt (`U(0,1) < p`, as the official)."""
    return jax.random.uniform(rng, (batch,), jnp.float32) < p


def apply_cfg_dropout(prompt_features: jax.Array, null_features: jax.Array, drop: jax.Array) -> jax.Array:
    """Replace the prompt features of the examples in `drop` by the empty prompt's features.

    prompt_features (B, L, D); null_features (L, D), (1, L, D) or (B, L, D), computed once from the
    empty prompt with the same text encoder and padding length.
    """
    null = null_features if null_features.ndim == 3 else null_features[None]
    if null.shape[1:] != prompt_features.shape[1:]:
        raise ValueError(f"null-prompt features {tuple(null_features.shape)} do not match the prompt "
                         f"features {tuple(prompt_features.shape)} (same length and width needed)")
    return jnp.where(drop[:, None, None], null.astype(prompt_features.dtype), prompt_features)


def cfg_dropout(rng: jax.Array, prompt_features: jax.Array, null_features: jax.Array,
                p: float = CFG_DROPOUT_P) -> tuple[jax.Array, jax.Array]:
    """(features with dropout applied, (B,) bool mask of dropped examples)."""
    drop = cfg_drop_mask(rng, prompt_features.shape[0], p)
    return apply_cfg_dropout(prompt_features, null_features, drop), drop
