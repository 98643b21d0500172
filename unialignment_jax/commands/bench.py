"""`unialignment bench`: step time, achieved FLOP/s as a ratio of a matmul peak measured in the same
process, and compile time (scan over layers vs unrolled).

Ratios measured in one process are what we compare across machines and commits: these machines are
shared and noisy, absolute seconds are not. Each measurement is the median of `--steps` timed calls
after a warm-up call; every call is blocked on (`block_until_ready`) so async dispatch cannot hide
work or pile executions up (STACK.md).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unialignment_jax.models import create, flops
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
from unialignment_jax.parallel import mesh as mesh_lib
from unialignment_jax.parallel import rules as rules_lib
from unialignment_jax import tasks as tasks_lib
from unialignment_jax.training.mfu import matmul_peak_flops, median_seconds


def _inputs(config, task: str, batch: int, cfg: DiTConfig):
    rng = np.random.default_rng(0)
    side = config.input.resolution // config.input.latent_downsample
    n_cond = tasks_lib.num_conditions(task, config.input.num_compose_refs)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    latents = f32(batch, side, side, cfg.in_channels)
    cond = f32(batch, n_cond, side, side, cfg.in_channels) if n_cond else None
    context = f32(batch, config.input.text_length, cfg.context_dim)
    ts = jnp.asarray(rng.uniform(0, 1000, batch), jnp.float32)
    return latents, cond, context, ts


def forward_backward(config, cfg: DiTConfig, mesh, rules):
    """A jitted value_and_grad of one image pass (velocity MSE + tap), and its sharded state."""
    model = create.create_sharded(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    graphdef, state = nnx.split(model)

    def loss(state, latents, cond, context, ts):
        out = nnx.merge(graphdef, state)(latents, context, ts, cond, tap=True)
        return jnp.mean(out["velocity"] ** 2) + jnp.mean(out["tap_image"]) + jnp.mean(out["tap_text"])

    return jax.jit(jax.value_and_grad(loss)), state


def compile_seconds(config, cfg: DiTConfig, mesh, rules, task: str, batch: int) -> float:
    fn, state = forward_backward(config, cfg, mesh, rules)
    args = _inputs(config, task, batch, cfg)
    start = time.perf_counter()
    with create.sharding_context(mesh, rules):
        fn.lower(state, *args).compile()
    return time.perf_counter() - start


def run(args, config) -> int:
    cfg = DiTConfig.from_config(config.model)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    batch = config.batch_size
    peak = matmul_peak_flops()
    result = {"backend": jax.default_backend(), "devices": jax.device_count(), "global_batch": batch,
              "matmul_peak_flops_per_device": peak, "tasks": {}}
    fn, state = forward_backward(config, cfg, mesh, rules)
    for task in args.tasks.split(","):
        tasks_lib.check_task(task, "--tasks")
        inputs = _inputs(config, task, batch, cfg)
        with create.sharding_context(mesh, rules):
            seconds = median_seconds(fn, state, *inputs, steps=args.steps)
        n_target = inputs[0].shape[1] * inputs[0].shape[2] // cfg.patch_size**2
        n_cond = 0 if inputs[1] is None else inputs[1].shape[1] * n_target
        step_flops = batch * flops.train_pass_flops(flops.dit_forward_flops(cfg, n_target, n_cond, config.input.text_length))
        achieved = step_flops / seconds / jax.device_count()
        result["tasks"][task] = {"forward_backward_seconds": seconds, "flops": step_flops,
                                 "achieved_flops_per_device": achieved, "ratio_to_matmul_peak": achieved / peak}
    if args.compile_compare:
        task = args.tasks.split(",")[0]
        for scan in (True, False):
            c = dataclasses.replace(cfg, scan_layers=scan)
            result[f"compile_seconds_scan_{str(scan).lower()}"] = compile_seconds(config, c, mesh, rules, task, batch)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['backend']} x{result['devices']}, global batch {batch}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s per device (2048^3 float32, same process)")
    for task, r in result["tasks"].items():
        print(f"  {task:10s} fwd+bwd {r['forward_backward_seconds']:.3f} s  "
              f"{r['achieved_flops_per_device'] / 1e9:.1f} GFLOP/s per device = "
              f"{100 * r['ratio_to_matmul_peak']:.0f}% of the matmul peak")
    for scan in ("true", "false"):
        if f"compile_seconds_scan_{scan}" in result:
            print(f"  compile (scan_layers={scan}): {result[f'compile_seconds_scan_{scan}']:.1f} s")
    return 0
