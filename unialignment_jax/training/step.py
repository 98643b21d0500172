"""One training step for one (stage, task): encode images with the frozen codec, draw all noise for
the whole batch, run the dual-stream objective over `accum_steps` micro-batches (`lax.scan`),
reduce, mask frozen parameters, clip + AdamW, skip non-finite updates, update the EMA.

Built as a pure function of (state, frozen, batch); the trainer jits it once per (stage, task)
with explicit shardings and donates the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unialignment_jax import tasks as tasks_lib
from unialignment_jax.objectives import unified
from unialignment_jax.training import state as state_lib
from unialignment_jax.training.schedule import Stage


@dataclasses.dataclass(frozen=True)
class StepStatics:
    """Everything a step closes over (static under jit)."""

    dit_graphdef: Any
    text_encoder: Callable  # text_state -> (ids -> features): training/encoders.Frozen.text_encoder
    codec_graphdef: Any  # the codec's (encode(pixels, rng)); None where batches hold latents only
    tx: optax.GradientTransformation
    options: unified.ObjectiveOptions
    mask_id: int
    grad_accum_reduce: str  # mean | sum
    ema_decay: float
    ema_warmup: bool


def _encode_images(statics: StepStatics, codec_state, batch: dict, rng) -> dict:
    """Replace pixel entries by codec latents (frozen, no gradient)."""
    if "target" not in batch and "cond" not in batch:
        return batch
    codec = nnx.merge(statics.codec_graphdef, codec_state)
    out = dict(batch)
    k_target, k_cond = jax.random.split(rng)
    if "target" in out:
        out["target_latents"] = jax.lax.stop_gradient(codec.encode(out.pop("target"), rng=k_target))
    if "cond" in out:
        cond = out.pop("cond")
        b, k = cond.shape[:2]
        lat = codec.encode(cond.reshape((b * k,) + cond.shape[2:]), rng=k_cond)
        out["cond_latents"] = jax.lax.stop_gradient(lat.reshape((b, k) + lat.shape[1:]))
    return out


def _micro_batches(tree, accum: int):
    """Strided split (example j of micro-batch i is j * accum + i): each device keeps its own
    examples, and (B, ...) -> (accum, B / accum, ...)."""
    def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        return jnp.moveaxis(x, 1, 0)
    return jax.tree.map(split, tree)


def step_key(stage: Stage, task: str) -> tuple:
    """What a compiled step depends on: stages that agree on all of it share one executable (the
    learning rate is an argument, not a constant)."""
    return (task, stage.weights, stage.accum_steps, stage.trainable, stage.batch_size, stage.resolution)


def build_train_step(statics: StepStatics, stage: Stage, task: str, trainable) -> Callable:
    """The step function for one (stage, task): `(state, frozen, batch, lr) -> (state, metrics)`.
    `trainable` is a pytree of Python bools."""
    tasks_lib.check_task(task)
    accum = stage.accum_steps
    weights = stage.weights

    def loss_fn(params, text_state, micro_batch, draws, null_features):
        model = nnx.merge(statics.dit_graphdef, params)
        return unified.dual_stream_loss(
            model, statics.text_encoder(text_state), micro_batch, None, task=task, null_features=null_features,
            mask_id=statics.mask_id, weights=weights, options=statics.options, draws=draws)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: state_lib.TrainState, frozen: dict, batch: dict, lr: jax.Array):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        rng_codec, rng_objective = jax.random.split(rng)
        batch = _encode_images(statics, frozen["codec"], batch, rng_codec)
        # All draws for the whole batch before splitting: accumulation then equals the big batch.
        draws = unified.draw_randomness(rng_objective, batch, task=task, options=statics.options)
        null = frozen["null_features"]

        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, frozen["text"], batch, draws, null)
        else:
            micro = _micro_batches((batch, draws), accum)

            def body(acc, mb):
                (_, m), g = grad_fn(state.params, frozen["text"], mb[0], mb[1], null)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            first = jax.tree.map(lambda x: x[0], micro)
            (_, metric_shapes), grad_shapes = jax.eval_shape(grad_fn, state.params, frozen["text"], *first, null)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
            (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, metrics)
        if statics.grad_accum_reduce == "sum":
            grads = jax.tree.map(lambda g: g * accum, grads)  # official: un-normalised micro-batch sum

        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = statics.tx.update(grads, state.opt_state, state.params)
        # Skip the update when the loss, the gradient or the applied update is not finite (an
        # update whose norm overflows float32 would leave parameters that are).
        update_norm = lr * optax.tree.norm(updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        new_params = jax.tree.map(lambda p, u, t: p - lr * u.astype(p.dtype) if t else p,
                                  state.params, updates, trainable)

        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params = keep(new_params, state.params)
        ema = state.ema
        if ema is not None:
            decay = state_lib.ema_decay(state.step, statics.ema_decay, statics.ema_warmup)
            ema = keep(state_lib.update_ema(ema, params, decay), state.ema)
        new_state = state_lib.TrainState(
            step=state.step + 1,
            params=params,
            opt_state=keep(opt_state, state.opt_state),
            ema=ema,
            rng=state.rng,
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
        )
        metrics = dict(metrics, grad_norm=grad_norm, update_norm=update_norm, lr=jnp.float32(lr),
                       finite=finite.astype(jnp.float32),
                       nonfinite_run=new_state.nonfinite.astype(jnp.float32))
        return new_state, metrics

    return train_step
