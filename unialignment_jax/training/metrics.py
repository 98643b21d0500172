"""Run metrics: TensorBoard event files (tensorboardX; clu's writers import TensorFlow) and
`W/metrics.jsonl`, one JSON object per logged step, plus a progress line for people at a terminal.

Only process 0 writes. The trainer hands over device arrays of an *earlier* step (already
computed), so logging never waits on the step in flight.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath


class MetricWriter:
    def __init__(self, workdir: epath.Path, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            (workdir / "tb").mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(logdir=str(workdir / "tb"), flush_secs=10)
            self._jsonl = (workdir / "metrics.jsonl").open("a")

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

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


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
