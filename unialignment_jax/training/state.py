"""The train state (a pure pytree of arrays, what Orbax saves), the optimizer, and the EMA.

TrainState fields:
  step      int32 scalar, the number of updates applied (also the index of the next step)
  params    nested dict of arrays: the DiT's nnx.State as a pure dict (`nnx.to_pure_dict`)
  opt_state optax state over `params` (clip -> Adam -> decoupled weight decay; the learning rate
            is applied by the step, so one optimizer state serves every stage)
  ema       EMA of params (same structure and shardings), or None when config.ema.decay == 0
  rng       uint32 key data; step k uses fold_in(rng, k), so resume replays the same randomness
  nonfinite int32 scalar: consecutive skipped (non-finite) updates

Frozen parameters (a stage's `trainable` regex) get zero gradients and zero updates (no weight
decay either); their Adam moments decay towards zero while frozen, which keeps one optimizer-state
structure across stages and checkpoints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from unialignment_jax.interop.convert import flatten, unflatten


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    rng: jax.Array
    nonfinite: jax.Array


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
    """clip(global norm) -> Adam moments -> decoupled weight decay; the step multiplies by -lr."""
    parts = []
    if opt_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
    parts.append(optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps))
    if opt_cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(opt_cfg.weight_decay))
    return optax.chain(*parts)


def init_state(params, tx: optax.GradientTransformation, seed: int, use_ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params) if use_ema else None,
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite=jnp.zeros((), jnp.int32),
    )


def trainable_mask(params, is_trainable) -> Any:
    """A pytree of Python bools (static under jit) from a predicate on '/'-joined paths."""
    return unflatten({path: bool(is_trainable(path)) for path in flatten(params)})


def ema_decay(step, decay: float, warmup: bool):
    if not warmup:
        return jnp.float32(decay)
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(ema, params, decay):
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def state_shardings(abstract_state: TrainState, abstract_params, mesh) -> TrainState:
    """Shardings of every TrainState leaf: params, EMA and every params-shaped optimizer subtree
    (Adam's mu and nu) sharded like the parameters; scalars and the rng replicated."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    param_shardings = nnx.to_pure_dict(jax.tree.map(lambda s: s.sharding, abstract_params))
    params_structure = jax.tree.structure(abstract_state.params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_params(tree):
        if jax.tree.structure(tree) == params_structure:
            return param_shardings
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple (optax states)
            return type(tree)(*(like_params(x) for x in tree))
        if isinstance(tree, (tuple, list)):
            return type(tree)(like_params(x) for x in tree)
        if isinstance(tree, dict):
            return {k: like_params(v) for k, v in tree.items()}
        return jax.tree.map(lambda _: replicated, tree)

    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=like_params(abstract_state.opt_state),
        ema=None if abstract_state.ema is None else param_shardings,
        rng=replicated,
        nonfinite=replicated,
    )
