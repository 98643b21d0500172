"""`unialignment bench`: the real train step's time per task, achieved FLOP/s as a ratio of a matmul
peak measured in the same process, compile times, data-pipeline headroom and sampler overhead.

The step is built the way `unialignment train` builds it (`aot.train_state_spec`, the frozen
encoders, `step.build_train_step`, jit with the state's shardings and donation), on the configured
mesh, fed random batches of the task's shapes. By default the batch holds precomputed latents (as
datasets written by `prepare --latents`); `--pixels` puts the codec's encoder in the step.

Ratios measured in one process are what we compare across machines and commits: these machines are
shared and noisy, absolute seconds are not. A step time is the median of `--steps` timed steps
after two warm-up steps; every step is blocked on (`block_until_ready`), so async dispatch neither
hides work nor piles executions up (docs/scaling.md, "Simulated devices"). After every step a
2048^3 matmul is timed, and the step's fraction of the matmul peak is the median over steps of its
rate / the peak sampled after it.

FLOPs are analytic (models/flops.py): matmul FLOPs x 3 for trained passes (no remat counted), full
non-causal joint attention, frozen encoders forward only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from unialignment_jax import tasks as tasks_lib
from unialignment_jax.data import pipeline
from unialignment_jax.data.sources import data_config
from unialignment_jax.models import create, flops
from unialignment_jax.models.layers import CPU_SCAN_ENV
from unialignment_jax.objectives import unified
from unialignment_jax.parallel import mesh as mesh_lib
from unialignment_jax.parallel import rules as rules_lib
from unialignment_jax.training import aot
from unialignment_jax.training import encoders as encoders_lib
from unialignment_jax.training import schedule as schedule_lib
from unialignment_jax.training import state as state_lib
from unialignment_jax.training import step as step_lib
from unialignment_jax.training.mfu import matmul_peak_flops


# ------------------------------------------------------------------------------------ building


def frozen_encoders(config, mesh, rules) -> encoders_lib.Frozen:
    """`encoders.build_frozen` (what the trainer uses); when the tokenizer's model file is not here
    (benchmark configs), the same encoders with the T5 token layout and the empty prompt encoded
    as EOS padding."""
    have_file = encoders_lib.tokenizer_file_here(config)
    return encoders_lib.build_frozen(config, mesh, rules,
                                     tokenizer=None if have_file else encoders_lib._AbstractTokenizer(config))


def bench_stage(config, task: str) -> schedule_lib.Stage:
    """The first stage that trains `task` (its loss weights, batch, accumulation, resolution), or
    the first stage with `task` as its only task."""
    stages = schedule_lib.from_config(config).stages
    stage = next((s for s in stages if task in s.tasks), stages[0])
    return dataclasses.replace(stage, tasks=(task,))


def random_batch(config, stage, task: str, mesh, *, latents: bool, vocab: int, seed: int = 0) -> dict:
    """A global batch of `task` with random contents, sharded like the trainer's batches."""
    abstract = aot.abstract_batch(config, stage, task, mesh, latents=latents)
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in abstract.items():
        if k == "prefix_len":
            x = np.zeros(s.shape, np.int32)
        elif np.issubdtype(s.dtype, np.integer):
            x = rng.integers(3, vocab - 1, s.shape).astype(np.int32)
        elif k in ("target", "cond"):
            x = rng.uniform(-1, 1, s.shape).astype(np.float32)
        else:
            x = rng.standard_normal(s.shape).astype(np.float32)
        out[k] = jax.device_put(x, s.sharding)
    return out


@dataclasses.dataclass
class StepBench:
    compiled: object
    state: object
    frozen: encoders_lib.Frozen
    batch: dict
    lr: np.float32
    lower_seconds: float
    compile_seconds: float
    flops: int
    examples: int

    last_metrics: dict | None = None

    def run(self) -> dict:
        self.state, metrics = self.compiled(self.state, self.frozen.arrays, self.batch, self.lr)
        jax.block_until_ready((self.state, metrics))
        self.last_metrics = metrics
        return metrics


def build_train_step(config, task: str, mesh, rules, *, latents: bool = True, frozen=None) -> StepBench:
    """The trainer's step for `task`, compiled, with a fresh state and a random batch."""
    tasks_lib.check_task(task)
    stage = bench_stage(config, task)
    spec = aot.train_state_spec(config, mesh, rules)
    frozen = frozen or frozen_encoders(config, mesh, rules)
    with create.sharding_context(mesh, rules):
        state = jax.jit(spec.fresh, out_shardings=spec.shardings)()
    trainable = state_lib.trainable_mask(spec.abstract.params, stage.is_trainable)
    fn = step_lib.build_train_step(aot.step_statics(config, spec, frozen), stage, task, trainable)
    jitted = jax.jit(fn, out_shardings=(spec.shardings, None), donate_argnums=(0,))
    batch = random_batch(config, stage, task, mesh, latents=latents, vocab=int(config.model.vocab_size))
    lr = np.float32(stage.lr or 1e-4)
    with create.sharding_context(mesh, rules):
        t0 = time.perf_counter()
        lowered = jitted.lower(state, frozen.arrays, batch, lr)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    jax.block_until_ready(state)
    return StepBench(compiled, state, frozen, batch, lr, t1 - t0, t2 - t1,
                     flops.step_flops(config, task, stage.batch_size, stage.resolution), stage.batch_size)


def time_calls_with_peak(fn, steps: int, peak_fn, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Wall times of `steps` calls of `fn`, each followed by a sample of `peak_fn()`, after `warmup`
    untimed (call, sample) pairs.

    On a shared machine the matmul rate drifts between seconds (112-211 GFLOP/s between processes
    here, docs/performance.md), so each step is compared with a peak sampled right after it rather than with one
    measured before all steps. Two warm-ups: the medium step still page-faults ~290k fresh pages in
    its second call (the allocator's heap grows twice before it is steady), none from the third."""
    for _ in range(warmup):
        fn()
        peak_fn()
    times, peaks = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        peaks.append(peak_fn())
    return times, peaks


def time_calls(fn, steps: int) -> list[float]:
    """Wall times of `steps` calls of `fn` (each blocks on its outputs) after one warm-up call."""
    return time_calls_with_peak(fn, steps, lambda: None, warmup=1)[0]


def compile_seconds(config, task: str, mesh, rules, *, latents: bool = True, **model_overrides) -> dict:
    """Lower + compile the real step from abstract inputs (nothing allocated) with `config.model`
    overridden, e.g. num_layers=24 or scan_layers=False."""
    c = copy.deepcopy(config)
    c.model.update(model_overrides)
    t0 = time.perf_counter()
    lowered = aot.lower_train_step(c, task, mesh, rules, stage_index=bench_stage(c, task).index, latents=latents)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_seconds": t1 - t0, "compile_seconds": t2 - t1, "total_seconds": t2 - t0}


# ----------------------------------------------------------------------- model-only comparison


def model_only_step(config, mesh, rules, task: str = "t2i", *, with_optimizer: bool = False):
    """The DiT forward + backward of both passes with the official losses (`dual_stream_loss`), no
    T5: the "text encoder" is a fixed random feature table looked up by token id (the same work a
    PyTorch reference does with the same table: benchmarks/torch_reference_step.py).

    Returns (fn, args): `fn(*args)` returns (loss, grads) (with_optimizer=False) or runs the
    trainer's whole update (clip, AdamW, EMA, guard) with the lookup encoder (with_optimizer=True).
    """
    from flax import nnx

    stage = bench_stage(config, task)
    spec = aot.train_state_spec(config, mesh, rules)
    with create.sharding_context(mesh, rules):
        state = jax.jit(spec.fresh, out_shardings=spec.shardings)()
    table_rows = int(config.text_encoder.vocab_size)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    table = jax.device_put(np.random.default_rng(1).standard_normal(
        (table_rows, int(config.model.context_dim))).astype(np.float32), rep)
    null = table[jnp.ones((1, int(config.input.text_length)), jnp.int32)]
    frozen_arrays = {"text": table, "codec": {}, "null_features": null}
    tokenizer = encoders_lib._AbstractTokenizer(config)
    options = aot.objective_options(config, tokenizer)
    lookup = lambda tbl: (lambda ids: tbl[ids])
    batch = random_batch(config, stage, task, mesh, latents=True, vocab=int(config.model.vocab_size))
    if with_optimizer:
        statics = step_lib.StepStatics(
            dit_graphdef=spec.graphdef, text_encoder=lookup, codec_graphdef=None, tx=spec.tx,
            options=options, mask_id=tokenizer.mask_id, grad_accum_reduce=config.optimizer.grad_accum_reduce,
            ema_decay=float(config.ema.decay), ema_warmup=bool(config.ema.warmup))
        trainable = state_lib.trainable_mask(spec.abstract.params, stage.is_trainable)
        fn = step_lib.build_train_step(statics, stage, task, trainable)
        jitted = jax.jit(fn, out_shardings=(spec.shardings, None), donate_argnums=(0,))
        holder = {"state": state}
        lr = np.float32(1e-4)

        def run():
            holder["state"], m = jitted(holder["state"], frozen_arrays, batch, lr)
            jax.block_until_ready((holder["state"], m))
        with create.sharding_context(mesh, rules):
            run()  # compile
        return run

    def loss_fn(params, table, batch, rng):
        model = nnx.merge(spec.graphdef, params)
        draws = unified.draw_randomness(rng, batch, task=task, options=options)
        return unified.dual_stream_loss(model, lookup(table), batch, None, task=task, null_features=null,
                                        mask_id=tokenizer.mask_id, weights=stage.weights, options=options,
                                        draws=draws)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    params = state.params
    key = jax.random.key(0)

    def run():
        with create.sharding_context(mesh, rules):
            jax.block_until_ready(grad_fn(params, table, batch, key))
    run()  # compile
    run.jitted, run.args = grad_fn, (params, table, batch, key)  # for HLO inspection / profiling
    return run


# ----------------------------------------------------------------------------------- the command


def _data_headroom(config, task: str, stage, step_examples_per_sec: float, seconds: float) -> dict:
    c = copy.deepcopy(config)
    note = None
    if not encoders_lib.tokenizer_file_here(c):
        c.tokenizer.kind = "byte"  # no tokenizer file here: byte tokens (tokenizing is a small part)
        note = "byte tokenizer (the config's tokenizer file is not here)"
    it = pipeline.make_train_iterator(c, task, "train", batch_size=stage.batch_size, resolution=stage.resolution)
    try:
        rate = pipeline.measure_throughput(it, seconds=seconds)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    out = {"examples_per_sec": rate, "step_examples_per_sec": step_examples_per_sec,
           "headroom": rate / step_examples_per_sec, "sources": str(data_config(c)[task])}
    if note:
        out["note"] = note
    return out


def _sampler_overhead(config, mesh, rules, task: str, steps: int, repeats: int) -> dict:
    """The image sampler's loop (`sampling.image.euler_sample`, `steps` Euler steps in one jitted
    lax.fori_loop) against `steps` separate calls of the bare DiT forward it wraps, same batch, no
    CFG: overhead = loop time / (steps x forward time) - 1."""
    try:
        from unialignment_jax.sampling.image import euler_sample
    except ImportError as e:
        return {"skipped": f"no sampling package ({e})"}
    from flax import nnx

    stage = bench_stage(config, task)
    spec = aot.train_state_spec(config, mesh, rules)
    with create.sharding_context(mesh, rules):
        params = jax.jit(lambda: spec.fresh().params, out_shardings=spec.shardings.params)()
    batch = random_batch(config, stage, task, mesh, latents=True, vocab=int(config.model.vocab_size))
    x = batch["target_latents"]
    context = jax.device_put(np.random.default_rng(2).standard_normal(
        (x.shape[0], int(config.input.text_length), int(config.model.context_dim))).astype(np.float32),
        pipeline.batch_sharding(mesh, 3))

    def velocity(params, x, t):
        return nnx.merge(spec.graphdef, params)(x, context, t)["velocity"]

    sigmas = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
    loop = jax.jit(lambda p, x: euler_sample(lambda xx, t: velocity(p, xx, t), x, sigmas))
    one = jax.jit(lambda p, x: velocity(p, x, jnp.full((x.shape[0],), 500.0, jnp.float32)))
    with create.sharding_context(mesh, rules):
        t_loop = statistics.median(time_calls(lambda: jax.block_until_ready(loop(params, x)), repeats))
        t_one = statistics.median(time_calls(lambda: jax.block_until_ready(one(params, x)), repeats))
    return {"denoising_steps": steps, "loop_seconds": t_loop, "forward_seconds": t_one,
            "overhead": t_loop / (steps * t_one) - 1.0}


def run(args, config) -> int:
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    latents = not getattr(args, "pixels", False)
    peak = matmul_peak_flops()
    result = {"backend": jax.default_backend(), "devices": jax.device_count(), "mesh": dict(mesh.shape),
              "matmul_peak_flops_per_device": peak, "latents": latents, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "tasks": {}}
    frozen = frozen_encoders(config, mesh, rules)
    for task in args.tasks.split(","):
        tasks_lib.check_task(task, "--tasks")
        sb = build_train_step(config, task, mesh, rules, latents=latents, frozen=frozen)
        times, peaks = time_calls_with_peak(sb.run, args.steps, lambda: matmul_peak_flops(steps=3))
        seconds = statistics.median(times)
        achieved = sb.flops / seconds / jax.device_count()
        # Each step against the peak sampled right after it; the median of those ratios.
        ratios = [sb.flops / t / jax.device_count() / p for t, p in zip(times, peaks)]
        r = {"step_seconds": seconds, "step_seconds_all": times, "global_batch": sb.examples, "flops": sb.flops,
             "achieved_flops_per_device": achieved, "matmul_peak_after_each_step": peaks,
             "ratio_to_matmul_peak": statistics.median(ratios), "ratio_to_matmul_peak_all": ratios,
             "examples_per_sec": sb.examples / seconds, "lower_seconds": sb.lower_seconds,
             "compile_seconds": sb.compile_seconds, "steps_run": int(jax.device_get(sb.state.step)),
             "last_step_metrics": {k: float(v) for k, v in jax.device_get(sb.last_metrics).items()}}
        if args.data_seconds > 0:
            try:
                r["data_pipeline"] = _data_headroom(config, task, bench_stage(config, task), sb.examples / seconds,
                                                    args.data_seconds)
            except Exception as e:  # a benchmark reports what it could not measure, and goes on
                logging.warning("bench: data pipeline of %s not measured: %s", task, e)
                r["data_pipeline"] = {"skipped": str(e)}
        result["tasks"][task] = r
        del sb
    if args.compile_compare:
        task = args.tasks.split(",")[0]
        n = int(config.model.num_layers)
        cases = {"scan": dict(scan_layers=True), "unrolled": dict(scan_layers=False),
                 "scan_24_layers": dict(scan_layers=True, num_layers=24),
                 "scan_8_layers": dict(scan_layers=True, num_layers=8)}
        # Compile only (nothing executes): simulated CPU devices may keep the scan here too
        # (models/layers.use_layer_scan), so "scan" is a scan on any backend.
        previous = os.environ.get(CPU_SCAN_ENV)
        os.environ[CPU_SCAN_ENV] = "1"
        try:
            result["compile"] = {name: compile_seconds(config, task, mesh, rules, latents=latents, **kw)
                                 for name, kw in cases.items()}
        finally:
            if previous is None:
                os.environ.pop(CPU_SCAN_ENV)
            else:
                os.environ[CPU_SCAN_ENV] = previous
        result["compile"]["layers_of_config"] = n
        result["compile"]["ratio_24_to_8_layers"] = (result["compile"]["scan_24_layers"]["total_seconds"]
                                                     / result["compile"]["scan_8_layers"]["total_seconds"])
    if args.sampler_steps > 0:
        try:
            result["sampler"] = _sampler_overhead(config, mesh, rules, args.tasks.split(",")[0], args.sampler_steps,
                                                  args.steps)
        except Exception as e:  # a benchmark reports what it could not measure, and goes on
            logging.warning("bench: sampler not measured: %s", e)
            result["sampler"] = {"skipped": str(e)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['backend']} x{result['devices']} mesh {result['mesh']}; matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"per device at start (2048^3 float32, same process); batch {'latents' if latents else 'pixels'}")
    for task, r in result["tasks"].items():
        print(f"  {task:10s} step {r['step_seconds']:.3f} s  {r['achieved_flops_per_device'] / 1e9:.1f} GFLOP/s per "
              f"device = {100 * r['ratio_to_matmul_peak']:.0f}% of the matmul peak sampled after each step "
              f"({min(r['matmul_peak_after_each_step']) / 1e9:.0f}-{max(r['matmul_peak_after_each_step']) / 1e9:.0f}"
              f" GFLOP/s)  (compile {r['lower_seconds']:.1f} + {r['compile_seconds']:.1f} s)")
        d = r.get("data_pipeline")
        if d and "headroom" in d:
            print(f"  {'':10s} data pipeline {d['examples_per_sec']:.1f} ex/s vs the step's "
                  f"{d['step_examples_per_sec']:.1f} ex/s: headroom {d['headroom']:.1f}x")
    if "compile" in result:
        for name, v in result["compile"].items():
            if isinstance(v, dict):
                print(f"  compile {name:15s} {v['total_seconds']:.1f} s (lower {v['lower_seconds']:.1f} s)")
        print(f"  compile 24 / 8 layers (scan): {result['compile']['ratio_24_to_8_layers']:.2f}x")
    sampler = result.get("sampler", {})
    if "skipped" in sampler:
        print(f"  sampler: skipped ({sampler['skipped']})")
    elif sampler:
        print(f"  sampler: {sampler['denoising_steps']} Euler steps {sampler['loop_seconds']:.3f} s vs "
              f"{sampler['denoising_steps']} x forward {sampler['forward_seconds']:.3f} s: overhead "
              f"{100 * sampler['overhead']:+.1f}%")
    return 0
