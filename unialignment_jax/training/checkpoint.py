"""Orbax checkpoints of a run: the train state, a JSON `meta` item (step, stage, config, the data
iterators' states), saved asynchronously.

* Keep policy: the last `keep_checkpoints` plus every step that is a multiple of
  `keep_checkpoint_every` (Orbax `max_to_keep` + `keep_period`).
* Atomicity: Orbax writes each step into a temporary directory and renames it when complete;
  `latest_step` only sees completed steps, so a crash mid-save leaves the previous checkpoint as the
  one that restores.
* Restore always targets the *current* mesh: the target is a tree of ShapeDtypeStructs carrying
  the shardings this run computed, so a run saved on one mesh resumes on another.
* The train state is saved as a plain dict of arrays (Orbax handles pure trees best;
  Variable-wrapped and pure checkpoints are not interchangeable).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

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
    need, without reading the optimizer state. Returns (params, step, meta)."""
    manager = ocp.CheckpointManager(epath.Path(paths.absolute(directory)), item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    steps = list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoint (train first, or check --workdir)")
    step = max(steps) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint at step {step} (have {sorted(steps)})")
    key = "ema" if ema else "params"
    target = {key: abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore()))
    except (KeyError, ValueError) as e:
        if ema:
            raise ValueError(f"{directory} step {step}: no EMA weights in this checkpoint (the run had "
                             f"ema.decay = 0?): {e}") from None
        raise
    manager.close()
    return dict(restored["state"])[key], step, dict(restored["meta"])
