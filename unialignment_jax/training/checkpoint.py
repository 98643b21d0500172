"""Orbax checkpoints of a run: the train state, a JSON `meta` item (step, stage, config, the data
iterators' states), saved asynchronously.

* Keep policy: the last `keep_checkpoints` plus every step that is a multiple of
  `keep_checkpoint_every` (Orbax `max_to_keep` + `keep_period`).
* Atomicity: Orbax writes each step into a temporary directory and renames it when complete;
  `latest_step` only sees completed steps, so a crash mid-save leaves the previous checkpoint as the
  one that restores.
* Restore always targets the *current* mesh: the target is a tree of ShapeDtypeStructs carrying
  the shardings this run computed, so a run saved on one mesh resumes on another.
* Damage (truncated array files, an emptied `meta`, a missing item: a disk that filled up, a copy
  cut short): `train` resumes from the newest step that reads and moves the damaged newer ones
  aside to `<step>.damaged-<time>` (kept, but no longer a step Orbax lists, so the run saves that
  step number again); when no step reads, it stops with one line per step and moves nothing.
  `restore_params` (sample / evaluate / export) names the step it cannot read and never falls back.
* The train state is saved as a plain dict of arrays (Orbax handles pure trees best;
  Variable-wrapped and pure checkpoints are not interchangeable).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from unialignment_jax import paths
from unialignment_jax.training.state import TrainState

STATE_FIELDS = TrainState._fields


def state_to_tree(state: TrainState) -> dict:
    tree = state._asdict()
    if tree["ema"] is None:
        tree.pop("ema")
    return tree


def tree_to_state(tree: dict) -> TrainState:
    return TrainState(**{k: tree.get(k) for k in STATE_FIELDS})


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or damage that cannot be set aside; the message names the
    step(s). A ValueError, so the commands' existing handlers print it as a one-line error."""


# Not damage: a missing optional client library (Orbax asks google-cloud-storage about a bucket)
# is the same for every step, and callers explain it themselves.
_NOT_DAMAGE = (ImportError,)


# TensorStore appends the JSON spec of what it opened to its errors, and Orbax the spec's repr to
# its own wrapper: kilobytes that name no file.
_SPECS = re.compile(r" ?\[tensorstore_spec(\[\d+\])?='.*?'\]| See full TensorStore details: .*", re.S)


def describe(error: BaseException, limit: int = 400) -> str:
    """One line for an Orbax / TensorStore error and its causes (outer first): types and messages,
    the specs left out, and the middle of a long chain of contexts (its end says what was wrong
    with which file)."""
    parts, cause = [], error
    while cause is not None and len(parts) < 3:
        parts.append(_SPECS.sub("", f"{type(cause).__name__}: {cause}"))
        if isinstance(cause, json.JSONDecodeError):  # it names no file
            parts[-1] += " (a JSON file of the step is empty or cut short)"
        cause = cause.__cause__
    text = " <- ".join(parts).replace("\n", " | ")
    return text if len(text) <= limit else f"{text[:120]} ... {text[-(limit - 125):]}"


def _drop_orphaned_reads(unraisable, *, previous):
    """After a failed restore, the reads still in flight end without anyone to report to: TensorStore
    completes them into Orbax's event loop, already closed ('RuntimeError: Event loop is closed',
    possibly seconds later), and Orbax's read coroutines, closed, raise their own error again. Each
    prints a traceback that says nothing new. Those alone are dropped; the rest goes to `previous`."""
    obj, error = unraisable.object, unraisable.exc_value
    if obj is None and isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    code = getattr(obj, "cr_code", None)  # a coroutine
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return
    previous(unraisable)


def _attempt(restore: Callable[..., Any], *args, **kwargs) -> tuple[Any, str | None]:
    """(restore(*args, **kwargs), None), or (None, one line saying what it raised: Orbax and
    TensorStore raise ValueError, KeyError, JSONDecodeError, OSError, ...). Orbax reads the arrays
    in concurrent asyncio tasks; when one fails, asyncio logs each other failure with its traceback
    as its task is collected (dozens of copies of the one error reported here): collected here,
    those records dropped, and the reads still in flight silenced for the rest of the process."""
    def keep(record):
        return "exception was never retrieved" not in record.getMessage()

    logger = logging.getLogger("asyncio")
    logger.addFilter(keep)
    try:
        return restore(*args, **kwargs), None
    except _NOT_DAMAGE:
        raise
    except Exception as e:
        if getattr(sys.unraisablehook, "func", None) is not _drop_orphaned_reads:
            sys.unraisablehook = functools.partial(_drop_orphaned_reads, previous=sys.unraisablehook)
        return None, describe(e)
    finally:
        gc.collect()
        logger.removeFilter(keep)


# Orbax's Checkpointer.restore reads, then waits at this barrier (orbax-checkpoint 0.12, default
# MultiprocessingOptions); a process whose reads raised never reached it. A change in Orbax shows
# as a hang in tests/test_checkpoint_damage.py's two-process test.
_ORBAX_RESTORE_BARRIER = "Checkpointer:restore"


def _same_on_all_processes(error: str | None) -> str | None:
    """Several processes: a step that one of them could not read is unreadable for all (each reads
    its own shards, so damage may show on one process only); all must then try the same next step.
    A process that failed first joins the barrier where the others wait (else every later
    collective would pair with the wrong one: a hang, or processes resuming different steps)."""
    if jax.process_count() == 1:
        return error
    if error is not None:
        ocp.multihost.sync_global_processes(_ORBAX_RESTORE_BARRIER)
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
    if error is None and failed.any():
        error = f"unreadable on process {int(np.argmax(failed))}"
    return error


def move_aside(directory: epath.PathLike, step: int) -> epath.Path:
    """Rename `directory/<step>` to `directory/<step>.damaged-<UTC time>` (no longer a step name, so
    Orbax neither lists nor deletes it). On a bucket (gs://) a rename copies each object on the
    server, then deletes the originals: not atomic, and as slow as the checkpoint is large."""
    directory = epath.Path(directory)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = directory / f"{step}.damaged-{stamp}", 1
    while target.exists():  # damaged twice within a second
        n += 1
        target = directory / f"{step}.damaged-{stamp}-{n}"
    (directory / str(step)).rename(target)
    return target


class Checkpointer:
    def __init__(self, directory: epath.PathLike, keep_last: int, keep_every: int = 0, async_save: bool = True):
        self.directory = epath.Path(paths.absolute(directory))  # Orbax refuses relative paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any], *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        if saved:
            logging.info("checkpoint: saving step %d (async)", step)
        return saved

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restore `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        target = state_to_tree(abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return tree_to_state(dict(restored["state"])), dict(restored["meta"])

    def restore_latest(self, abstract_state: TrainState) -> tuple[int | None, TrainState | None, dict | None]:
        """(step, state, meta) of the newest checkpoint that reads; (None, None, None) when there is none.

        A newer step that fails to read (any error Orbax or TensorStore raises while restoring it) is
        logged with a warning naming it, then moved aside by process 0 once an older step has read,
        so that nothing is moved when the cause is common to all steps (a changed model config).
        Raises CheckpointError when no step reads (one line per step; nothing moved), or when a
        damaged step cannot be moved aside (a later save of that step number would fail)."""
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            restored, error = _attempt(self.restore, step, abstract_state)
            if restored is not None:  # nothing in flight when the processes compare (docs/scaling.md)
                jax.block_until_ready(restored[0])
            error = _same_on_all_processes(error)
            if error is None:
                self._move_aside([s for s, _ in failures])
                return step, *restored
            logging.warning("checkpoint: step %d in %s cannot be read (%s)", step, self.directory, error)
            failures.append((step, error))
        if failures:
            lines = "".join(f"\n  step {s}: {e}" for s, e in failures)
            raise CheckpointError(f"no checkpoint in {self.directory} can be read (nothing was moved or deleted; a "
                                  f"model config other than the run's fails on every step too):{lines}")
        return None, None, None

    def _move_aside(self, steps: list[int]) -> None:
        """Process 0 renames each damaged step; every process then re-lists the steps."""
        if not steps:
            return
        problem = ""
        if jax.process_index() == 0:
            for step in steps:
                try:
                    target = move_aside(self.directory, step)
                except Exception as e:  # a bucket or filesystem that refuses the rename
                    problem = (f"step {step} in {self.directory} is damaged and could not be moved aside "
                               f"({describe(e)}): move or delete it, then run again (a save of step {step} "
                               "would fail while it is there)")
                    break
                logging.warning("checkpoint: damaged step %d moved aside to %s", step, target)
        if jax.process_count() > 1:  # also the barrier: nobody re-lists before process 0 has renamed
            failed = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
            if int(failed) and not problem:
                problem = f"process 0 could not move the damaged step(s) {steps} in {self.directory} aside"
        self.manager.reload()
        if problem:
            raise CheckpointError(problem)

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: epath.PathLike, abstract_params: dict, *, ema: bool = False,
                   step: int | None = None) -> tuple[dict, int, dict[str, Any]]:
    """Only the parameters (or their EMA) of a run's checkpoint, onto the shardings carried by
    `abstract_params` (a pure dict of ShapeDtypeStructs): what `sample`, `evaluate` and `export`
    need, without reading the optimizer state. Returns (params, step, meta).

    A step that cannot be read (damaged files) raises CheckpointError naming it and the other
    steps. There is no fallback to an older step: a user asking for the latest weights must know
    they are not getting them, and can pass an older step explicitly."""
    manager = ocp.CheckpointManager(epath.Path(paths.absolute(directory)), item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{directory}: no checkpoint (train first, or check --workdir)")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (have {sorted(steps)})")
        key = "ema" if ema else "params"
        target = {key: abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored, error = _attempt(manager.restore, step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore()))
        if error is not None:
            others = sorted(set(steps) - {step})
            hint = f"; other steps: {', '.join(map(str, others))} (choose one with --step)" if others else ""
            raise CheckpointError(f"{directory}: step {step} cannot be read ({error}){hint}")
    finally:
        manager.close()
    params = dict(restored["state"]).get(key)
    # partial_restore hands back the target's own ShapeDtypeStructs for what the checkpoint lacks.
    if params is None or any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        what = "EMA weights (the run had ema.decay = 0?)" if ema else "parameters"
        raise CheckpointError(f"{directory} step {step}: no {what} in this checkpoint")
    return params, step, dict(restored["meta"])
