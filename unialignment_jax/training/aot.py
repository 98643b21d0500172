"""The train state's shapes and shardings, and the real train step lowered from abstract inputs.

`train_state_spec` is what the trainer and every tool that compiles or restores a run agree on;
`lower_train_step` compiles the exact step `unialignment train` runs (both passes, the frozen text
encoder and codec inside, the optimizer) without allocating anything, so `inspect --compile` can
plan the 2B model's per-device memory on simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unialignment_jax import tasks as tasks_lib
from unialignment_jax.data import pipeline
from unialignment_jax.models import create
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
from unialignment_jax.objectives import unified
from unialignment_jax.training import encoders as encoders_lib
from unialignment_jax.training import schedule as schedule_lib
from unialignment_jax.training import state as state_lib
from unialignment_jax.training import step as step_lib


@dataclasses.dataclass
class StateSpec:
    graphdef: Any  # the DiT's graphdef
    abstract: state_lib.TrainState  # ShapeDtypeStructs carrying the target shardings
    shardings: state_lib.TrainState
    tx: Any
    fresh: Callable[[], state_lib.TrainState]  # builds a fresh state (call under jit)


def train_state_spec(config, mesh, rules) -> StateSpec:
    dit_cfg = DiTConfig.from_config(config.model)
    make_dit = lambda: UniAlignmentDiT(dit_cfg, rngs=nnx.Rngs(config.seed))
    graphdef, abstract_params = create.abstract_state(make_dit, mesh, rules)
    tx = state_lib.make_optimizer(config.optimizer)
    use_ema = config.ema.decay > 0

    def fresh():
        with nnx.use_eager_sharding(False):
            params = nnx.to_pure_dict(nnx.state(make_dit()))
        return state_lib.init_state(params, tx, config.seed, use_ema)

    with create.sharding_context(mesh, rules):
        shapes = jax.eval_shape(fresh)
    shardings = state_lib.state_shardings(shapes, abstract_params, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return StateSpec(graphdef=graphdef, abstract=abstract, shardings=shardings, tx=tx, fresh=fresh)


def objective_options(config, tokenizer) -> unified.ObjectiveOptions:
    o = config.objective
    return unified.ObjectiveOptions(
        flow_loss=o.flow_loss, timestep_shift=o.timestep_shift, cfg_dropout=o.cfg_dropout,
        text_normalize=o.text_normalize, contrastive_group_size=o.contrastive_group_size or None,
        antithetic_group_size=o.antithetic_group_size or None, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def step_statics(config, spec: StateSpec, frozen: encoders_lib.Frozen) -> step_lib.StepStatics:
    return step_lib.StepStatics(
        dit_graphdef=spec.graphdef, text_encoder=frozen.text_encoder, codec_graphdef=frozen.codec_graphdef,
        tx=spec.tx, options=objective_options(config, frozen.tokenizer),
        mask_id=frozen.tokenizer.mask_id, grad_accum_reduce=config.optimizer.grad_accum_reduce,
        ema_decay=float(config.ema.decay), ema_warmup=bool(config.ema.warmup))


def abstract_batch(config, stage: schedule_lib.Stage, task: str, mesh, *, latents: bool = False) -> dict:
    """ShapeDtypeStructs of one global batch of `task` at the stage's batch size and resolution
    (pixels by default, so the codec's encoder is part of the step; `latents` for precomputed)."""
    side = stage.resolution // config.input.latent_downsample
    latent_shape = (side, side, config.model.in_channels) if latents else None
    teacher = config.model.adapter_out if (stage.weights.align_image or stage.weights.align_text) else None
    shapes = pipeline.batch_shapes(config, task, stage.batch_size, stage.resolution, latent_shape, teacher)
    if task in ("caption", "vqa"):
        shapes.pop("teacher_image", None)
    return {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=pipeline.batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def lower_train_step(config, task: str, mesh, rules, *, stage_index: int = 0, batch_size: int | None = None,
                     accum_steps: int | None = None, latents: bool = False):
    """The train step of (stage, task) lowered from abstract inputs: `.compile()` it to get XLA's
    per-device memory analysis or to check that it compiles on a mesh. `batch_size` / `accum_steps`
    override the stage's global batch and number of micro-batches."""
    tasks_lib.check_task(task)
    schedule = schedule_lib.from_config(config)
    stage = schedule.stages[stage_index]
    stage = dataclasses.replace(stage, batch_size=batch_size or stage.batch_size,
                                accum_steps=accum_steps or stage.accum_steps)
    if stage.batch_size % stage.accum_steps:
        raise ValueError(f"batch {stage.batch_size} is not divisible into {stage.accum_steps} micro-batches")
    spec = train_state_spec(config, mesh, rules)
    frozen = encoders_lib.abstract_frozen(config, mesh, rules)
    trainable = state_lib.trainable_mask(spec.abstract.params, stage.is_trainable)
    fn = step_lib.build_train_step(step_statics(config, spec, frozen), stage, task, trainable)
    jitted = jax.jit(fn, out_shardings=(spec.shardings, None), donate_argnums=(0,))
    batch = abstract_batch(config, stage, task, mesh, latents=latents)
    lr = jax.ShapeDtypeStruct((), np.float32)
    with create.sharding_context(mesh, rules):
        return jitted.lower(spec.abstract, frozen.arrays, batch, lr)
