"""Run metrics: TensorBoard event files (tensorboardX; clu's writers import TensorFlow),
`W/metrics.jsonl` (one JSON object per logged step), optionally Weights & Biases
(training/wandb_run.py), and a progress line for people at a terminal.

Only process 0 writes and prints. The trainer fetches each step's scalars after the *next* step is
dispatched (the step is then finished or nearly), so logging never waits on the step in flight.

What a logged row holds (`IntervalMeans`): every scalar is the mean over the steps since the last
logged row (the first step is logged alone), each scalar over the steps that reported it (a mixed
interval's `loss/<term>` averages the steps whose task has that term):
  - skipped (non-finite) steps are left out of the means of the model's scalars (`loss`,
    `loss/<term>`, `grad_norm`, `update_norm`, ...): those values are nan / inf and never reached
    the parameters. When every step of the interval was skipped, the means are over all its steps
    (so the row shows the non-finite values);
  - `finite` is the fraction of the interval's steps whose update was applied; `lr` the mean over
    all its steps; `nonfinite_run` (consecutive skipped steps) and `data/skipped_records` (a count
    since the start) are the last step's values;
  - `examples_per_sec` and `flops_utilization` are the interval's examples and FLOPs over its time
    (compilation and in-training sampling excluded).
The means are kept on the host in float64: the per-step scalars are fetched anyway (the trainer
reads every step's non-finite run), while clu.metrics.Average's eager jnp merges cost about 12 ms
of host time per step for 15 scalars (measured on CPU), on the loop's critical path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath


class MetricWriter:
    """`W/tb/` and `W/metrics.jsonl`. A remote workdir (gs://...) is staged: tensorboardX writes local
    files only and object stores cannot append, so both are written in a local directory and
    mirrored to the workdir (changed files re-uploaded whole) at most every `sync_secs`, on flush()
    and on close(); a resumed run first fetches the workdir's metrics.jsonl to continue it."""

    def __init__(self, workdir: epath.Path, *, enabled: bool = True, sync_secs: float = 60.0, wandb=None):
        self.enabled = enabled
        self._wandb = wandb  # a training.wandb_run.WandbRun (process 0, config.wandb.project set) or None
        self._tb = None
        self._jsonl = None
        self._remote = None  # (the workdir, the local staging directory) for a remote workdir
        self._uploaded: dict[str, int] = {}
        self._sync_secs, self._last_sync = sync_secs, time.monotonic()
        if enabled:
            from tensorboardX import SummaryWriter

            from unialignment_jax import paths

            workdir = epath.Path(workdir)
            local = workdir
            if paths.is_remote(workdir):
                local = epath.Path(tempfile.mkdtemp(prefix="unialignment-metrics-"))
                self._remote = (workdir, local)
                if (workdir / "metrics.jsonl").exists():
                    paths.copy_tree(workdir / "metrics.jsonl", local / "metrics.jsonl")
            (local / "tb").mkdir(parents=True, exist_ok=True)
            # A unique suffix: two writers started in the same second (a quick restart) must not
            # share an event file name (a bucket object would be overwritten).
            self._tb = SummaryWriter(logdir=str(local / "tb"), flush_secs=10,
                                     filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
            self._jsonl = (local / "metrics.jsonl").open("a")

    def _sync(self, force: bool = False) -> None:
        """Mirror the staged files to a remote workdir (no-op for a local one)."""
        if self._remote is None or (not force and time.monotonic() - self._last_sync < self._sync_secs):
            return
        self._tb.flush()
        self._jsonl.flush()
        self._upload()

    def _upload(self) -> None:
        from unialignment_jax import paths

        workdir, local = self._remote
        for root, _, files in os.walk(local):  # the staging directory is local
            for name in sorted(files):
                f = os.path.join(root, name)
                rel, size = os.path.relpath(f, local), os.path.getsize(f)
                if self._uploaded.get(rel) != size:
                    paths.copy_tree(f, workdir / rel)
                    self._uploaded[rel] = size
        self._last_sync = time.monotonic()

    def write_scalars(self, step: int, scalars: Mapping[str, Any], **extra) -> dict:
        """Write numeric scalars (device arrays are fetched here) and extra JSON fields."""
        values = {k: float(v) for k, v in jax.device_get(dict(scalars)).items()}
        if not self.enabled:
            return values
        for k, v in values.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        record = {"step": step, **extra, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(step, values)
        self._sync()
        return values

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """HWC uint8 (or float in [0, 1]) images."""
        if self.enabled:
            for k, img in images.items():
                self._tb.add_image(k, np.asarray(img), step, dataformats="HWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        if self.enabled:
            for k, text in texts.items():
                self._tb.add_text(k, text, step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self.enabled:
            self._tb.add_text("config", "```\n" + json.dumps(dict(hparams), indent=2) + "\n```", 0)

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()
            self._sync(force=True)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            if self._remote is not None:
                self._upload()
                self._remote[1].rmtree(missing_ok=True)
        if self._wandb is not None:
            self._wandb.finish()

    @property
    def tb_dir(self) -> epath.Path | None:
        """The local directory tensorboardX writes (mirrored to W/tb for a remote workdir)."""
        return epath.Path(self._tb.logdir) if self.enabled else None


class IntervalMeans:
    """The scalars of the steps since the last logged row, reduced as the module docstring says."""

    LAST = ("nonfinite_run",)  # a state, not a per-step quantity
    ALL_STEPS = ("finite", "lr")  # averaged over every step, skipped ones included

    def __init__(self):
        self._sums: dict[str, list[float]] = {}  # name -> [sum over finite steps, count, sum over all, count]
        self._last: dict[str, float] = {}
        self._examples = self._flops = self._seconds = 0.0

    def add(self, values: Mapping[str, float], *, examples: int, flops: float, seconds: float) -> None:
        """One finished step: its host scalars (`finite` = 1 for an applied update), its examples,
        FLOPs and seconds."""
        finite = float(values.get("finite", 1.0)) > 0
        for name, v in values.items():
            v = float(v)
            if name in self.LAST:
                self._last[name] = v
                continue
            acc = self._sums.setdefault(name, [0.0, 0, 0.0, 0])
            if finite or name in self.ALL_STEPS:
                acc[0] += v
                acc[1] += 1
            acc[2] += v
            acc[3] += 1
        self._examples += examples
        self._flops += flops
        self._seconds += seconds

    def pop(self, peak_flops_per_second: float) -> dict[str, float]:
        """The interval's row (see the module docstring); starts the next interval."""
        row = {name: (s / n if n else s_all / n_all) for name, (s, n, s_all, n_all) in self._sums.items()}
        row.update(self._last)
        seconds = max(self._seconds, 1e-9)
        row["examples_per_sec"] = self._examples / seconds
        row["flops_utilization"] = self._flops / seconds / peak_flops_per_second
        self.__init__()
        return row


class Progress:
    """One status line with ETA; on a terminal a progress bar redrawn in place, plain log lines otherwise.
    Printed by process 0 only (`enabled`)."""

    def __init__(self, total_steps: int, start_step: int, mode: str = "auto", stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = {"on": True, "off": False}.get(mode, self.stream.isatty())
        self.enabled = enabled
        self.total, self.start_step = total_steps, start_step
        self.start_time = time.perf_counter()

    def update(self, step: int, stage: str, task: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - step)
        loss = values.get("loss", float("nan"))
        line = (f"step {step}/{self.total} [{stage}/{task}] loss {loss:.4f} "
                f"{values.get('examples_per_sec', 0.0):.1f} ex/s  ETA {_hms(eta)}")
        if self.tty:  # a bar in front: the carriage-return line is redrawn in place
            filled = int(20 * step / max(self.total, 1))
            line = f"[{'#' * filled}{'.' * (20 - filled)}] {line}"
            self.stream.write("\r" + line.ljust(120))
            self.stream.flush()
        else:
            self.stream.write(line + "\n")

    def close(self) -> None:
        if self.tty and self.enabled:
            self.stream.write("\n")


class ProcessTagFormatter(logging.Formatter):
    """Prefixes another formatter's lines with `[p<process index>]` (multi-host runs)."""

    def __init__(self, inner: logging.Formatter, index: int):
        super().__init__()
        self.inner, self.tag = inner, f"[p{index}]"

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.tag} {self.inner.format(record)}"


def tag_logs_with_process(index: int | None = None, count: int | None = None, logger: logging.Logger | None = None):
    """When several processes run (after jax.distributed is initialized), every line the root
    logger's (or `logger`'s) handlers write starts with `[p<index>]`: merged host logs stay apart."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if count <= 1:
        return
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, ProcessTagFormatter):
            handler.setFormatter(ProcessTagFormatter(handler.formatter or logging.Formatter(), index))


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
