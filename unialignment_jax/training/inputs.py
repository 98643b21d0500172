"""The trainer's view of the data: one Grain iterator per (stage, task), created on first use at
the stage's batch size and resolution, restored to its checkpointed position, and host batches
turned into global arrays sharded over the data-parallel mesh axes."""

from __future__ import annotations

import logging

from unialignment_jax.data import pipeline
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
    d = pipeline.data_config(config)
    sources = pipeline.task_sources(config, task, "train", resolution)
    return pipeline.example_format(task, [s.spec for s in sources], resolution, int(config.input.text_length),
                                   config.tokenizer, bool(d["teacher"]))


def step_flops(config, stage, task) -> int:
    return flops.step_flops(config, task, stage.batch_size, stage.resolution)


class TrainInputs:
    def __init__(self, config, schedule, tokenizer, mesh, rules, saved_states: dict):
        del tokenizer  # the pipeline builds its own from config.tokenizer
        self.config, self.schedule, self.mesh = config, schedule, mesh
        self.saved = dict(saved_states)
        self.iterators: dict[str, pipeline.HostBatchIterator] = {}

    def _iterator(self, stage, task) -> pipeline.HostBatchIterator:
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
        """Positions of every iterator (and of saved ones not reopened yet), for the checkpoint."""
        return {**self.saved, **{k: it.get_state() for k, it in self.iterators.items()}}

    def skipped(self) -> int:
        return sum(int(it.skipped_records) for it in self.iterators.values())

    def close(self) -> None:
        for it in self.iterators.values():
            close = getattr(it, "close", None)
            if close:
                close()
