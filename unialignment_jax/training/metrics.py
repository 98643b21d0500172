"""Run metrics: TensorBoard event files (tensorboardX; clu's writers import TensorFlow) and
`W/metrics.jsonl`, one JSON object per logged step, plus a progress line for people at a terminal.

Only process 0 writes. The trainer hands over device arrays of an *earlier* step (already
computed), so logging never waits on the step in flight.
"""

from __future__ import annotations

import json
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

    def __init__(self, workdir: epath.Path, *, enabled: bool = True, sync_secs: float = 60.0):
        self.enabled = enabled
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


class Progress:
    """One status line with ETA; a carriage-return line on a terminal, plain log lines otherwise."""

    def __init__(self, total_steps: int, start_step: int, mode: str = "auto", stream=None):
        self.stream = stream or sys.stderr
        self.tty = {"on": True, "off": False}.get(mode, self.stream.isatty())
        self.total, self.start_step = total_steps, start_step
        self.start_time = time.perf_counter()

    def update(self, step: int, stage: str, task: str, values: Mapping[str, float]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - step)
        loss = values.get("loss", float("nan"))
        line = (f"step {step}/{self.total} [{stage}/{task}] loss {loss:.4f} "
                f"{values.get('examples_per_sec', 0.0):.1f} ex/s  ETA {_hms(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.stream.flush()
        else:
            self.stream.write(line + "\n")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
