"""The image sampler (t2i, edit, perception, compose): Euler steps of flow matching with
classifier-free guidance, as the official pipeline (docs/method.md, "Image sampler"), in one jitted computation.

  x_N ~ N(0, I) per example (key = fold_in(key(seed), example index): a sample does not depend on
        the batch it was drawn in, nor on padding)
  for i in 0 .. N-1 (lax.fori_loop):
      v = v_u + w (v_c - v_u)        v_c: the prompt; v_u: the negative prompt (official default
                                     "low quality, blurry, ..."), condition latents kept in both
      x <- x + (sigma_{i+1} - sigma_i) v      (float32, diffusers' Euler step)
  pixels = codec.decode(x)

Guidance is off when w <= 1 (the official `do_classifier_free_guidance = guidance_scale > 1`): one
model call per step. With guidance, both branches run as one model call on a doubled batch whose
rows are interleaved per example ([u_0, c_0, u_1, c_1, ...]), so each device keeps its own rows
(no resharding per step when the batch is sharded over data x fsdp). Condition images are encoded
with the codec inside the same computation (the official samples the VAE posterior; the pixel
codec is exact), prompts with the frozen text encoder.

`euler_sample` is the pure loop (any velocity function); `build_image_sampler` closes it over the
DiT, the text encoder and the codec.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unialignment_jax.objectives import flow_matching
from unialignment_jax.parallel.rules import constrain

NEGATIVE_PROMPT = ("low quality, blurry, low resolution, backlit, cartoon, animated, deformed, oversaturated, "
                   "undersaturated, out of frame")  # infer.py / generate_bench_img.py


def example_noise(seed: jax.Array, indices: jax.Array, shape: tuple, salt: int = 0) -> jax.Array:
    """(B, *shape) float32 standard normal draws, one key per example: fold_in(key(seed), index)."""
    base = jax.random.fold_in(jax.random.key(seed), salt)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def euler_sample(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                 sigmas: jax.Array) -> jax.Array:
    """Euler integration of dx/dsigma = v from sigmas[0] to sigmas[-1] (lax.fori_loop).

    velocity_fn(x (B, ...), timesteps (B,) = 1000 sigma) -> v (B, ...). sigmas: (N + 1,) float32.
    """
    n = sigmas.shape[0] - 1
    b = x.shape[0]

    def body(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = jnp.broadcast_to(flow_matching.model_timesteps(sigma), (b,))
        v = velocity_fn(x, t).astype(jnp.float32)
        return x.astype(jnp.float32) + (sigma_next - sigma) * v

    return jax.lax.fori_loop(0, n, body, x.astype(jnp.float32))


def guided_velocity(model_fn, context, negative_context, cond_latents, guidance, use_cfg: bool):
    """velocity_fn(x, t) for `euler_sample`: the model, with guidance when `use_cfg`.

    model_fn(latents, context, timesteps, cond_latents) -> velocity. context / negative_context
    (B, L, D); cond_latents (B, K, h, w, C) or None (kept in the unconditional branch).
    """
    if not use_cfg:
        return lambda x, t: model_fn(x, context, t, cond_latents)

    b = context.shape[0]
    pair = lambda a, c: jnp.stack([a, c], axis=1).reshape((2 * b,) + a.shape[1:])  # [u_0, c_0, u_1, ...]
    twice = lambda a: jnp.repeat(a, 2, axis=0)
    ctx2 = pair(negative_context.astype(context.dtype), context)
    cond2 = None if cond_latents is None else twice(cond_latents)

    def velocity(x, t):
        v = model_fn(twice(x), ctx2, twice(t), cond2).astype(jnp.float32)
        v = v.reshape((b, 2) + v.shape[1:])
        v_u, v_c = v[:, 0], v[:, 1]
        return v_u + guidance * (v_c - v_u)

    return velocity


def build_image_sampler(dit_graphdef, text_encoder, codec_graphdef, latent_shape: tuple, use_cfg: bool) -> Callable:
    """The sampler as a pure function, to be jitted:

      fn(params, text_state, codec_state, prompt_ids (B, L), negative_ids (B, L), cond (B, K, R, R, 3)
         pixels in [-1, 1] or None, seed () uint32, indices (B,) int32, sigmas (N + 1,), guidance ())
         -> pixels (B, R', R', 3) float32 in [-1, 1] (clipped)

    text_encoder: text_state -> (ids -> features) (training/encoders.Frozen.text_encoder).
    """
    def sample(params, text_state, codec_state, prompt_ids, negative_ids, cond, seed, indices, sigmas, guidance):
        encode = text_encoder(text_state)
        codec = nnx.merge(codec_graphdef, codec_state)
        context = jax.lax.stop_gradient(encode(prompt_ids)).astype(jnp.float32)
        negative = jax.lax.stop_gradient(encode(negative_ids)).astype(jnp.float32) if use_cfg else None
        cond_latents = None
        if cond is not None:
            b, k = cond.shape[:2]
            # Official: the VAE posterior is sampled (`latent_dist.sample()`); salt 1 keeps these
            # draws apart from the initial noise.
            rng = jax.random.fold_in(jax.random.key(seed), 1)
            lat = codec.encode(cond.reshape((b * k,) + cond.shape[2:]), rng=rng)
            cond_latents = lat.reshape((b, k) + lat.shape[1:])

        def model_fn(x, ctx, t, cl):
            model = nnx.merge(dit_graphdef, params)
            return model(x, ctx, t, cl)["velocity"]

        x = constrain(example_noise(seed, indices, latent_shape), ("act_batch", None, None, None))
        velocity = guided_velocity(model_fn, context, negative, cond_latents, guidance, use_cfg)
        latents = euler_sample(velocity, x, sigmas)
        return jnp.clip(codec.decode(latents), -1.0, 1.0)

    return sample
