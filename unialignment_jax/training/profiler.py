"""`config.profile = "START:STOP"`: a jax.profiler trace of training steps START..STOP (numbered
as in metrics.jsonl: the first step is 1) written under `W/tb/`, in the layout TensorBoard's
profile plugin opens (`tb/plugins/profile/<run>/<host>.xplane.pb`; `pip install tensorboard-plugin-profile`).

Every process traces its own host. The trace starts before step START is dispatched and stops once
step STOP has finished on the devices (the trainer blocks on the state first), so it holds whole
steps. A resumed run traces the part of the window it runs; a run that ends inside the window
(signal, error, last step) closes the trace. A remote workdir gets the trace copied from a local
directory when it stops (the profiler writes local files).
"""

from __future__ import annotations

import contextlib
import logging
import time

import jax

from unialignment_jax import paths


def parse(spec: str) -> tuple[int, int] | None:
    """"START:STOP" -> (START, STOP); "" -> None. Raises ValueError saying what is wrong."""
    if spec == "":
        return None
    start, colon, stop = str(spec).partition(":")
    if not (colon and start.strip().isdigit() and stop.strip().isdigit()):
        raise ValueError('use "START:STOP" (step numbers, e.g. "10:12"), or "" for no trace')
    start, stop = int(start), int(stop)
    if not 1 <= start <= stop:
        raise ValueError("needs 1 <= START <= STOP (the first step is 1)")
    return start, stop


class StepTrace:
    """Calls around each step: `before(n)` before step n is dispatched, `after(n, state)` once it
    is; `close()` at the end of the run."""

    def __init__(self, spec: str, workdir):
        self.window = parse(spec)
        self.tb = paths.join(workdir, "tb")
        self._stack: contextlib.ExitStack | None = None  # open while tracing

    def before(self, n: int) -> None:
        if self.window is None or self._stack is not None or not self.window[0] <= n <= self.window[1]:
            return
        self._stack = contextlib.ExitStack()
        local = self._stack.enter_context(paths.staged_output(self.tb))  # tb itself when local
        jax.profiler.start_trace(local)
        logging.info("profile: tracing steps %d-%d into %s", n, self.window[1], self.tb)

    def after(self, n: int, state) -> float:
        """Stops the trace after its last step; returns the seconds that took (not the step's time)."""
        if self._stack is None or n < self.window[1]:
            return 0.0
        jax.block_until_ready(state)  # the trace must hold the step's device work
        t0 = time.perf_counter()
        self.close()
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            jax.profiler.stop_trace()
            stack.close()  # a remote workdir: uploads the trace
            logging.info("profile: trace written under %s/plugins/profile", self.tb)
