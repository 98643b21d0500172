"""Stopping a run cleanly: SIGTERM (preemption) and Ctrl-C (SIGINT) end in a checkpoint and exit 0.

One process: Python handlers, installed before the (long) start-up so that a signal then also ends
in a save, record the request; the loop saves after the step in flight and returns. After the first
request, Ctrl-C has its default action again: a second Ctrl-C aborts at once (KeyboardInterrupt).

Several processes: every host must stop after the same step, so jax.distributed's preemption sync
manager (which receives SIGTERM itself; a Python SIGTERM handler would replace its own) decides,
through `reached_preemption_sync_point`. Ctrl-C on one host is turned into a SIGTERM to itself,
which the sync manager then shares with every host; a second Ctrl-C aborts that host.
"""

from __future__ import annotations

import os
import signal

from jax.experimental import multihost_utils


class StopRequest:
    def __init__(self, multi_process: bool):
        self.multi_process = multi_process
        self.signal: str | None = None  # set once a stop is requested
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        signums = (signal.SIGINT,) if self.multi_process else (signal.SIGINT, signal.SIGTERM)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # os.write: a signal handler may run inside a logging call (its lock is held then).
            os.write(2, b"\nunialignment train: Ctrl-C: saving after this step and exiting "
                        b"(Ctrl-C again aborts without saving)\n")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C aborts
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # jax.distributed's preemption notice, for every host
        else:
            self.signal = name

    def reached(self, done: int) -> bool:
        """True when the run must save and stop after step `done` (every process agrees)."""
        if self.multi_process and multihost_utils.reached_preemption_sync_point(done):
            self.signal = "preemption (all processes)"
        return self.signal is not None
