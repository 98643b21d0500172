"""The text samplers (caption, VQA): masked discrete diffusion on the official time grid, in two
orders of unmasking.

`order = "random"` is the official one: the `ddpm_cache` update of MDLM / Dual Diffusion, as the
official `ConditionalMaskedDiffusionSampler` (docs/method.md, "Text sampler").

  x = the given prefix (VQA: the question's tokens with their trailing EOS; caption: the run's
      input.caption_prompt, or none as officially), MASK elsewhere
  t_i = linspace(1, 1e-5, N + 1)[i], s_i = t_i - dt, dt = (1 - 1e-5) / N
  for i in 0 .. N-1:
      p = exp(SUBS log p_theta(x0 | x))        reused while x has not changed (the cache)
      q = p (t_i - s_i), q[MASK] = s_i          (unnormalised; a still-masked token stays MASK with
                                                 weight s_i)
      draw = argmax(q / E), E = 1e-10 - log(U + 1e-10), U ~ U(0, 1)   (the official Gumbel-max
                                                 form of a categorical draw)
      x <- x where x != MASK, else draw         (unmasked tokens are copied)
  x = argmax SUBS log p_theta(x0 | x)          ("noise removal": the remaining MASKs)

The model call (`denoise`) re-encodes x through the frozen text encoder and runs the DiT on the
clean image latent at timestep 0; its SUBS log-probabilities are `objectives.text_diffusion.
subs_log_probs`. In the jitted loop the cache is a `lax.cond`: the model runs only when some token
of the batch changed in the previous step (the official test `allclose(x_next, x)` is over its
batch too; recomputing unchanged rows gives the same values, so the result equals per-row caching).
`use_cache=False` recomputes every step (the uncached loop, same compiled program). The number of
model calls is returned as well.

`order = "confidence"` (our default) unmasks the most confident positions first, as MaskGIT and
LLaDA's low-confidence remasking do: at step i every still-masked position gets the argmax token of
p_theta (with `temperature` > 0, a Gumbel-max draw from p_theta^(1/temperature)) and its log-prob
as confidence; the most confident ones are kept so that floor(n (i + 1) / N) of a row's n free
positions are unmasked after step i (the count the official grid unmasks on average), the rest
stay MASK. Why: the DiT's text stream has no positions of its own and the frozen T5's are
relative, so the random order's first draws land at random places; then a caption comes out
with the right words in a partly wrong order (docs/quality.md). Confident positions
are those next to what is known (a prompt, the tokens already placed), so the text grows from its
anchors. A step that unmasks nothing in the batch reuses the previous model output (the cache).

Random draws: key(seed) -> fold_in(example index) -> fold_in(step), so a sample does not depend on
the batch it was drawn in.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unialignment_jax.objectives import text_diffusion
from unialignment_jax.sampling import schedule


def example_keys(seed: jax.Array, indices: jax.Array, salt: int = 2) -> jax.Array:
    base = jax.random.fold_in(jax.random.key(seed), salt)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def gumbel_categorical(key: jax.Array, probs: jax.Array) -> jax.Array:
    """argmax(probs / E) with E = 1e-10 - log(U + 1e-10): the official `_sample_categorical`."""
    u = jax.random.uniform(key, probs.shape, jnp.float32)
    return jnp.argmax(probs / (1e-10 - jnp.log(u + 1e-10)), axis=-1).astype(jnp.int32)


def masked_diffusion_sample(denoise: Callable[[jax.Array], jax.Array], x_init: jax.Array, keys: jax.Array,
                            num_steps: int, mask_id: int, use_cache: jax.Array | bool = True,
                            eps: float = schedule.TEXT_EPS) -> tuple[jax.Array, jax.Array]:
    """The ddpm_cache loop. denoise(x (B, L) int32) -> SUBS log-probs (B, L, V) float32.

    x_init: (B, L) int32 with `mask_id` at the positions to fill; keys: (B,) per-example keys.
    Returns (tokens (B, L) int32, number of model calls () int32).
    """
    times, dt = schedule.text_times(num_steps, eps)
    times = jnp.asarray(times)
    dt = jnp.float32(dt)
    use_cache = jnp.asarray(use_cache, bool)
    x_init = x_init.astype(jnp.int32)
    probs_shape = jax.eval_shape(denoise, x_init)

    def probs_of(x):
        return jnp.exp(denoise(x))

    def body(i, carry):
        x, probs, valid, calls = carry
        recompute = jnp.logical_not(valid & use_cache)
        probs = jax.lax.cond(recompute, probs_of, lambda _: probs, x)
        calls = calls + recompute.astype(jnp.int32)
        t = times[i]
        s = t - dt
        vocab = jnp.arange(probs.shape[-1])
        q = jnp.where(vocab == mask_id, s, probs * (t - s))
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        draw = jax.vmap(gumbel_categorical)(step_keys, q)
        x_next = jnp.where(x != mask_id, x, draw)
        valid = jnp.all(x_next == x)
        return x_next, probs, valid, calls

    init = (x_init, jnp.zeros(probs_shape.shape, jnp.float32), jnp.asarray(False), jnp.int32(0))
    x, probs, valid, calls = jax.lax.fori_loop(0, num_steps, body, init)
    recompute = jnp.logical_not(valid & use_cache)
    probs = jax.lax.cond(recompute, probs_of, lambda _: probs, x)
    calls = calls + recompute.astype(jnp.int32)
    # Noise removal: argmax of the SUBS distribution (unmasked positions keep their token).
    return jnp.argmax(probs, axis=-1).astype(jnp.int32), calls


def confidence_sample(denoise: Callable[[jax.Array], jax.Array], x_init: jax.Array, keys: jax.Array,
                      num_steps: int, mask_id: int, use_cache: jax.Array | bool = True,
                      temperature: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """The confidence-ordered loop (module docstring); same arguments and returns as
    `masked_diffusion_sample`. After the N steps every free position is filled."""
    use_cache = jnp.asarray(use_cache, bool)
    x_init = x_init.astype(jnp.int32)
    free = jnp.sum(x_init == mask_id, axis=-1)  # (B,) positions to fill per row
    probs_shape = jax.eval_shape(denoise, x_init)

    def body(i, carry):
        x, logp, valid, calls = carry
        recompute = jnp.logical_not(valid & use_cache)
        logp = jax.lax.cond(recompute, denoise, lambda _: logp, x)
        calls = calls + recompute.astype(jnp.int32)
        if temperature > 0:
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
            noise = jax.vmap(lambda k: jax.random.gumbel(k, logp.shape[1:], jnp.float32))(step_keys)
            token = jnp.argmax(logp / temperature + noise, axis=-1)
        else:
            token = jnp.argmax(logp, axis=-1)
        confidence = jnp.take_along_axis(logp, token[..., None], axis=-1)[..., 0]
        masked = x == mask_id
        # How many to unmask now: the row's target count after this step minus those already placed.
        take = (free * (i + 1)) // num_steps - (free - jnp.sum(masked, axis=-1))
        confidence = jnp.where(masked, confidence, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-confidence, axis=-1, stable=True), axis=-1, stable=True)
        x_next = jnp.where(masked & (rank < take[:, None]), token.astype(jnp.int32), x)
        valid = jnp.all(x_next == x)
        return x_next, logp, valid, calls

    init = (x_init, jnp.zeros(probs_shape.shape, jnp.float32), jnp.asarray(False), jnp.int32(0))
    x, _, _, calls = jax.lax.fori_loop(0, num_steps, body, init)
    return x, calls


ORDERS = ("confidence", "random")


def prefix_init(prefix_ids: jax.Array, prefix_len: jax.Array, mask_id: int) -> jax.Array:
    """The prior: the first prefix_len tokens of prefix_ids (the VQA question), MASK elsewhere."""
    given = jnp.arange(prefix_ids.shape[1])[None, :] < prefix_len[:, None]
    return jnp.where(given, prefix_ids, mask_id).astype(jnp.int32)


def build_text_sampler(dit_graphdef, text_encoder, codec_graphdef, mask_id: int,
                       num_steps: int, order: str = "confidence", temperature: float = 0.0) -> Callable:
    """The sampler as a pure function, to be jitted (`order`: "confidence" or "random", the
    official ddpm_cache; `temperature`: the confidence order's draws, 0 = argmax):

      fn(params, text_state, codec_state, image (B, R, R, 3) pixels in [-1, 1], prefix_ids (B, L),
         prefix_len (B,), seed () uint32, indices (B,) int32, use_cache () bool)
         -> (tokens (B, L) int32, model calls () int32)
    """
    def sample(params, text_state, codec_state, image, prefix_ids, prefix_len, seed, indices, use_cache):
        encode = text_encoder(text_state)
        codec = nnx.merge(codec_graphdef, codec_state)
        # Official: the VAE posterior is sampled (`latent_dist.sample()`).
        latents = codec.encode(image, rng=jax.random.fold_in(jax.random.key(seed), 3))
        b = image.shape[0]

        def denoise(x):
            model = nnx.merge(dit_graphdef, params)
            context = jax.lax.stop_gradient(encode(x))
            logits = model(latents, context, jnp.zeros((b,), jnp.float32), None)["text_logits"]
            return text_diffusion.subs_log_probs(logits, x, mask_id)

        x0 = prefix_init(prefix_ids, prefix_len, mask_id)
        if order == "random":
            return masked_diffusion_sample(denoise, x0, example_keys(seed, indices), num_steps, mask_id, use_cache)
        return confidence_sample(denoise, x0, example_keys(seed, indices), num_steps, mask_id, use_cache,
                                 temperature)

    if order not in ORDERS:
        raise ValueError(f"text sampler order {order!r}: choose one of {', '.join(ORDERS)}")
    if temperature < 0:
        raise ValueError(f"text sampler temperature {temperature}: must be >= 0")
    return sample
