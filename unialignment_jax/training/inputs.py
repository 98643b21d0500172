"""The trainer's view of the data: one Grain iterator per (stage, task), created on first use at
the stage's batch size and resolution, restored to its checkpointed position, and host batches
turned into global arrays sharded over the data-parallel mesh axes."""

from __future__ import annotations

import logging

import json

import jax
import numpy as np

from unialignment_jax.data import batching, pipeline
from unialignment_jax.data.decode import config_format
from unialignment_jax.data.sources import task_sources
from unialignment_jax.models import flops


def check_data_config(config, schedule) -> None:
    """Every source a stage reads opens and fits the config, and a non-zero alignment weight has
    teacher features to align to; raises ValueError naming the key, before anything is written."""
    for stage in schedule.stages:
        pipeline.check_data_config(config, stage.tasks, resolutions=[stage.resolution])
        for task in stage.tasks:
            if stage.weights.align_image == 0 and stage.weights.align_text == 0:
                continue
            fmt = _format(config, task, stage.resolution)
            if not fmt.teacher_dim:
                raise ValueError(
                    f"config.stages.{stage.name}.loss_weights: align_image / align_text are non-zero but the "
                    f"{task} data (config.data.{task}) has no teacher features; set those weights to 0 or "
                    "prepare the data with --teacher")


def _format(config, task, resolution):
    return config_format(config, task, task_sources(config, task, "train", resolution), resolution)


def step_flops(config, stage, task) -> int:
    return flops.step_flops(config, task, stage.batch_size, stage.resolution)


class TrainInputs:
    def __init__(self, config, schedule, mesh, rules, saved: dict | None):
        """`saved`: the checkpoint's data entry ({'process_count', 'per_process'}) or None."""
        self.config, self.schedule, self.mesh = config, schedule, mesh
        self.saved = {}
        if saved:
            if saved.get("process_count") == jax.process_count():
                self.saved = dict(saved["per_process"][jax.process_index()])
            else:
                logging.warning("data: the checkpoint holds iterator positions for %s processes, this run has %d; "
                                "the data iterators restart from the beginning", saved.get("process_count"),
                                jax.process_count())
        self.iterators: dict[str, batching.HostBatchIterator] = {}

    def _iterator(self, stage, task) -> batching.HostBatchIterator:
        key = f"{stage.name}/{task}"
        if key not in self.iterators:
            it = pipeline.make_train_iterator(self.config, task, "train", batch_size=stage.batch_size,
                                              resolution=stage.resolution,
                                              seed=self.config.seed + 1000 * stage.index)
            if key in self.saved:
                it.set_state(self.saved[key])
                logging.info("data: %s restored to its checkpointed position", key)
            self.iterators[key] = it
        return self.iterators[key]

    def next_batch(self, stage, task) -> dict:
        return pipeline.to_global_batch(next(self._iterator(stage, task)), self.mesh)

    def states(self) -> dict:
        """Positions of every iterator of every process (and of saved ones not reopened yet), for
        the checkpoint: each host reads its own shard, so each has its own positions."""
        mine = {**self.saved, **{k: it.get_state() for k, it in self.iterators.items()}}
        return {"process_count": jax.process_count(), "per_process": _allgather_json(mine)}

    def skipped(self) -> int:
        return sum(int(it.skipped_records) for it in self.iterators.values())

    def close(self) -> None:
        for it in self.iterators.values():
            close = getattr(it, "close", None)
            if close:
                close()


def _allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(np.asarray(gathered), np.asarray(lengths))]
