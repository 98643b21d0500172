"""`unialignment train`: the one training loop, readable top to bottom.

  1. check the config against the devices, the MASK row and the data (exit 2 before anything is written)
  2. mesh, frozen encoders (text encoder, codec, tokenizer), the train state's shapes/shardings
  3. a fresh sharded train state, or the latest checkpoint restored onto this mesh
  4. data iterators per (stage, task), restored to their saved positions
  5. one compiled step per (stage, task), built on first use (AOT: lower + compile)
  6. the loop: pick stage and task from the step, run, fetch the previous step's metrics (logged as
     means over config.log_every steps), checkpoint, sample (every config.sample_every steps, from
     the EMA weights when kept), trace config.profile's steps, stop on SIGTERM or Ctrl-C (save,
     exit 0; training/stop.py) or on too many non-finite steps

Run: unialignment train --config experiments/demo.py --workdir runs/demo --cpu_devices 8
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import numpy as np
from clu import parameter_overview
from etils import epath

from unialignment_jax import config as config_lib
from unialignment_jax.models import create
from unialignment_jax.models import encoders as encoder_factories
from unialignment_jax.parallel import mesh as mesh_lib
from unialignment_jax.parallel import rules as rules_lib
from unialignment_jax.sampling import hook as sample_hook_lib
from unialignment_jax.sampling import prompts as sample_prompts_lib
from unialignment_jax.training import aot
from unialignment_jax.training import checkpoint as checkpoint_lib
from unialignment_jax.training import encoders as encoders_lib
from unialignment_jax.training import inputs as inputs_lib
from unialignment_jax.training import metrics as metrics_lib
from unialignment_jax.training import mfu
from unialignment_jax.training import profiler
from unialignment_jax.training import schedule as schedule_lib
from unialignment_jax.training import state as state_lib
from unialignment_jax.training import step as step_lib
from unialignment_jax.training import stop as stop_lib
from unialignment_jax.training import wandb_run


class TrainingError(RuntimeError):
    pass


def run(args, config) -> int:
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step by step
    mesh_lib.initialize_distributed(config.distributed)
    metrics_lib.tag_logs_with_process()  # several hosts: "[p<index>]" on every log line
    # SIGTERM / Ctrl-C: save after the step in flight and exit 0 (also during start-up).
    stop = stop_lib.StopRequest(multi_process=jax.process_count() > 1)
    stop.install()
    try:
        return _train(args, config, stop)
    except KeyboardInterrupt:  # a second Ctrl-C
        print("unialignment train: aborted; the latest checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        stop.restore()


def _train(args, config, stop: stop_lib.StopRequest) -> int:
    workdir = epath.Path(args.workdir)
    # -- 1. checks that need the devices, before anything is written ---------------------------
    try:
        config_lib.check_mesh_fits(config, jax.device_count())
        encoder_factories.check_mask_embedding(config)  # pretrained T5 needs its MASK row chosen
        schedule = schedule_lib.from_config(config)
        inputs_lib.check_data_config(config, schedule)
        if config.sample_every:  # a sample.prompts file that gives no prompts (PromptError)
            sample_prompts_lib.from_config(config.sample.prompts)
        wandb_run.check_installed(config)
    except (config_lib.ConfigError, ValueError) as e:
        print(f"unialignment train: config error: {e}", file=sys.stderr)
        return 2
    simulated = jax.default_backend() == "cpu" and jax.device_count() > 1
    if config.compilation_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    is_writer = jax.process_index() == 0

    # -- 2. mesh, frozen encoders, the train state's shapes and shardings ----------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    frozen = encoders_lib.build_frozen(config, mesh, rules)  # text encoder, codec, tokenizer, null prompt
    spec = aot.train_state_spec(config, mesh, rules)
    state_shardings = spec.shardings
    # In-training samples (sampling/hook.py): fixed prompts / edits / captions, compiled on first use.
    sample = sample_hook_lib.make_sample_hook(config, frozen, mesh, rules) if config.sample_every else None

    # -- 3. fresh or restored state -------------------------------------------------------------
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints,
                                               config.keep_checkpoint_every)
    try:  # the newest checkpoint that reads; damaged newer steps are moved aside (checkpoint.py)
        latest, state, meta = checkpointer.restore_latest(spec.abstract)
    except checkpoint_lib.CheckpointError as e:
        checkpointer.close()
        print(f"unialignment train: {e}", file=sys.stderr)
        return 1
    data_states = None
    if latest is None:
        with create.sharding_context(mesh, rules):
            state = jax.jit(spec.fresh, out_shardings=state_shardings)()
        if is_writer:
            (workdir / "config.json").write_text(config_lib.to_json(config))
        logging.info("train: fresh run in %s", workdir)
    else:
        data_states = meta.get("data")
        logging.info("train: resumed %s at step %d (stage %s)", workdir, latest, meta.get("stage"))
    jax.block_until_ready(state)  # nothing may be in flight when the first step starts (docs/scaling.md)
    start_step = int(jax.device_get(state.step))
    n_params = state_lib.count_params(state.params)
    if is_writer:  # shapes only: statistics would gather every value from every host
        table = parameter_overview.get_parameter_overview(state.params, include_stats=False)
        logging.info("DiT parameters:\n%s", table)
    logging.info("DiT parameters: %s; mesh %s; rules %s", f"{n_params:,}", dict(mesh.shape), config.sharding.rules)

    # -- 4. data --------------------------------------------------------------------------------
    data = inputs_lib.TrainInputs(config, schedule, mesh, rules, data_states)

    # -- 5. compiled steps, built on first use --------------------------------------------------
    statics = aot.step_statics(config, spec, frozen)
    compiled = {}

    def compiled_step(stage, task, batch, lr):
        """(the compiled step, seconds spent compiling it now)."""
        key = step_lib.step_key(stage, task)
        if key in compiled:
            return compiled[key], 0.0
        trainable = state_lib.trainable_mask(state.params, stage.is_trainable)
        fn = step_lib.build_train_step(statics, stage, task, trainable)
        jitted = jax.jit(fn, out_shardings=(state_shardings, None), donate_argnums=(0,))
        t0 = time.perf_counter()
        with create.sharding_context(mesh, rules):
            compiled[key] = jitted.lower(state, frozen.arrays, batch, lr).compile()
        seconds = time.perf_counter() - t0
        logging.info("compiled the %s step of stage %s in %.1f s", task, stage.name, seconds)
        return compiled[key], seconds

    # -- 6. the loop ----------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir, enabled=is_writer,
                                      wandb=wandb_run.start(config, workdir) if is_writer else None)
    if latest is None:
        writer.write_hparams(config.to_dict())
    peak, peak_source = mfu.device_peak_flops()
    logging.info("MFU peak per device: %.3g FLOP/s (%s)", peak, peak_source)
    log = _Log(writer, metrics_lib.Progress(schedule.total_steps, start_step, config.progress, enabled=is_writer),
               metrics_lib.IntervalMeans(), config, jax.device_count() * peak)
    trace = profiler.StepTrace(config.profile, workdir)

    def meta(step):
        return {"step": step, "stage": schedule.stage_at(step).name, "data": data.states(),
                "config": json.loads(config_lib.to_json(config))}

    # `pending` is the previous step: its metrics are read (accumulated, logged, checked for
    # non-finite runs) after the next step is dispatched, so the host never waits on the step in flight.
    pending = None
    last_saved = start_step
    try:
        for step in range(start_step, schedule.total_steps):
            trace.before(step + 1)
            t0 = time.perf_counter()
            stage, task = schedule.stage_at(step), schedule.task_at(step)
            lr = np.float32(stage.lr_at(step - stage.start))
            batch = data.next_batch(stage, task)
            fn, compile_seconds = compiled_step(stage, task, batch, lr)
            state, step_metrics = fn(state, frozen.arrays, batch, lr)
            if simulated:  # XLA:CPU's simulated devices deadlock with executions in flight (docs/scaling.md)
                jax.block_until_ready(state.step)
            if pending is not None:
                # The previous step's time: from its start to this one's, less this one's compile.
                pending.seconds = t0 - pending.start_time
                _finish(pending, log, checkpointer)
            pending = _Pending(step, stage, task, step_metrics, t0 + compile_seconds, stage.batch_size,
                               data.skipped())
            done = step + 1
            pending.start_time += trace.after(done, state)  # writing the trace is not the step's time
            if done % config.checkpoint_every == 0 or done == schedule.total_steps:
                checkpointer.save(state, meta(done), force=True)
                last_saved = done
                if simulated:  # an async save's transfers overlapping the next step can deadlock XLA:CPU
                    checkpointer.wait()
            if sample is not None and done % config.sample_every == 0:
                t_sample = time.perf_counter()
                sample(done, state.ema if state.ema is not None else state.params, writer, workdir)
                pending.start_time += time.perf_counter() - t_sample  # not part of the step's time
            if stop.reached(done):
                logging.warning("train: signal %s after step %d: saving and exiting", stop.signal, done)
                if last_saved != done:
                    checkpointer.save(state, meta(done), force=True)
                break
        if pending is not None:
            jax.block_until_ready(state.step)
            pending.seconds = time.perf_counter() - pending.start_time
            _finish(pending, log, checkpointer, final=True)
    except TrainingError as e:
        print(f"unialignment train: {e}", file=sys.stderr)
        return 1
    finally:
        trace.close()
        log.progress.close()
        checkpointer.close()
        writer.close()
        data.close()
    return 0


@dataclasses.dataclass
class _Pending:
    step: int
    stage: schedule_lib.Stage
    task: str
    metrics: dict
    start_time: float
    examples: int
    skipped_records: int
    seconds: float = 0.0


@dataclasses.dataclass
class _Log:
    writer: metrics_lib.MetricWriter
    progress: metrics_lib.Progress
    interval: metrics_lib.IntervalMeans  # the steps since the last logged row
    config: config_lib.ConfigDict
    peak: float  # FLOP/s of all devices together


def _finish(p: _Pending, log: _Log, checkpointer, final=False):
    """Add a completed step to the interval, log the interval's means when due, and stop on a run
    of non-finite steps."""
    config = log.config
    values = jax.device_get(p.metrics)  # the step is done (or nearly): the next one is queued behind it
    log.interval.add(values, examples=p.examples, flops=inputs_lib.step_flops(config, p.stage, p.task),
                     seconds=p.seconds)
    if final or (p.step + 1) % config.log_every == 0 or p.step == 0:
        row = log.interval.pop(log.peak)
        row["data/skipped_records"] = p.skipped_records
        scalars = log.writer.write_scalars(p.step + 1, row, stage=p.stage.name, task=p.task)
        log.progress.update(p.step + 1, p.stage.name, p.task, scalars)
    run = int(values["nonfinite_run"])
    if run >= config.max_nonfinite_steps:
        checkpointer.wait()
        raise TrainingError(
            f"{run} consecutive non-finite steps (loss or gradient norm) up to step {p.step + 1}: stopping. "
            f"Those updates were skipped; the last good checkpoint (step {checkpointer.latest_step()}) is "
            "intact. Lower the learning rate or check the data.")
