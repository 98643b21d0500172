"""The stage schedule: which stage, task, learning rate and trainable set each global step uses.

Stages come from `config.stages`, an ordered ConfigDict keyed by stage name, trained in order.
Everything here is a pure function of the global step (and the seed), so a resumed run makes the
same choices as an uninterrupted one.

Task assignment within a stage:
  * `task_weights = ''`: the listed tasks take whole steps in turn (the official recipe alternates
    t2i and edit/perception steps: step k trains tasks[k % n]);
  * `task_weights = '3,1'`: a seeded weighted mixture (task of step k drawn from a generator seeded
    with (seed, k), so it does not depend on history).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from unialignment_jax import tasks as tasks_lib
from unialignment_jax.objectives.unified import TERMS, LossWeights

LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    index: int
    start: int  # first global step of the stage
    steps: int
    tasks: tuple[str, ...]
    task_probs: tuple[float, ...] | None  # None: round robin
    weights: LossWeights
    lr: float
    warmup_steps: int
    lr_schedule: str
    final_lr_fraction: float
    trainable: str  # regex over '/'-joined parameter paths
    batch_size: int  # global
    accum_steps: int  # micro-batches per step
    resolution: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    def lr_at(self, step_in_stage: int) -> float:
        """Learning rate at a step of this stage: linear warm-up, then constant or cosine decay.
        Computed on the host and passed to the step as an argument (one executable per shape).
        Warm-up gives lr * (k + 1) / warmup_steps at stage step k, a deliberate difference from the
        official schedule (diffusers' get_constant_schedule_with_warmup: k / warmup_steps), whose
        first step has learning rate 0 and so is a wasted step."""
        s = float(step_in_stage)
        warm = min(1.0, (s + 1.0) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "constant":
            decay = 1.0
        else:
            span = max(self.steps - self.warmup_steps, 1)
            progress = min(max((s - self.warmup_steps) / span, 0.0), 1.0)
            decay = self.final_lr_fraction + (1.0 - self.final_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * warm * decay

    def is_trainable(self, path: str) -> bool:
        return re.fullmatch(self.trainable, path) is not None


class Schedule:
    def __init__(self, stages: list[Stage], seed: int):
        self.stages = stages
        self.seed = seed
        self.total_steps = stages[-1].end

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if step < stage.end:
                return stage
        return self.stages[-1]

    def task_at(self, step: int) -> str:
        stage = self.stage_at(step)
        k = step - stage.start
        if stage.task_probs is None:
            return stage.tasks[k % len(stage.tasks)]
        draw = np.random.default_rng([self.seed, 7919, step]).random()
        # min(): the cumulative sum can end a rounding error below 1.0, under the largest draws
        index = int(np.searchsorted(np.cumsum(stage.task_probs), draw, side="right"))
        return stage.tasks[min(index, len(stage.tasks) - 1)]


def _parse_list(value: str, key: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in str(value).split(",") if v.strip())
    if not items:
        raise ValueError(f"config.{key} is empty")
    return items


def from_config(config) -> Schedule:
    """Build the schedule; raises ValueError naming the config key on bad values."""
    stages, start = [], 0
    for index, name in enumerate(config.stages.keys()):
        s = config.stages[name]
        key = f"stages.{name}"
        tasks = _parse_list(s.tasks, f"{key}.tasks")
        for t in tasks:
            tasks_lib.check_task(t, f"config.{key}.tasks")
        probs = None
        if s.task_weights:
            w = [float(x) for x in _parse_list(s.task_weights, f"{key}.task_weights")]
            if len(w) != len(tasks) or min(w) < 0 or sum(w) <= 0:
                raise ValueError(f"config.{key}.task_weights = {s.task_weights!r}: one non-negative weight "
                                 f"per task ({len(tasks)}), not all zero")
            probs = tuple(x / sum(w) for x in w)
        weights = LossWeights.from_mapping({t: s.loss_weights[t] for t in TERMS})
        if s.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"config.{key}.lr_schedule = {s.lr_schedule!r}: choose one of {LR_SCHEDULES}")
        try:
            re.compile(s.trainable)
        except re.error as e:
            raise ValueError(f"config.{key}.trainable = {s.trainable!r}: not a regex ({e})") from None
        batch = s.batch_size or config.batch_size
        if batch % s.accum_steps:
            raise ValueError(f"config.{key}.accum_steps = {s.accum_steps}: must divide the batch size {batch}")
        stages.append(Stage(
            name=name, index=index, start=start, steps=s.steps, tasks=tasks, task_probs=probs, weights=weights,
            lr=s.lr, warmup_steps=s.warmup_steps, lr_schedule=s.lr_schedule,
            final_lr_fraction=s.final_lr_fraction, trainable=s.trainable, batch_size=batch,
            accum_steps=s.accum_steps, resolution=s.resolution or config.input.resolution))
        start += s.steps
    return Schedule(stages, config.seed)
