"""Progress bars of the long commands (prepare, evaluate, sample, export, import): one helper, so
that every bar behaves alike.

A bar is a tqdm bar on stderr (count, rate, ETA when the total is known), drawn only on process 0
and only when stderr is a terminal, unless the environment variable UNIALIGNMENT_PROGRESS says
otherwise: `1` draws it anyway (a log file, a test capturing stderr), `0` never. While a bar is
drawn, console log lines are written above it (tqdm's logging redirect) instead of through it.

  with progress.bar(total=n, desc="prepare", unit="row") as bar:
      ... bar.update(1)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Callable, Iterator

import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

ENV = "UNIALIGNMENT_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _process_zero() -> bool:
    # jax only when the command already imported it: `prepare` runs without jax.
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


@functools.cache
def _warn_bad_value(value: str) -> None:
    logging.warning("%s=%r: ignored (use 1: always draw progress bars, 0: never, unset: on a terminal)", ENV, value)


def disable() -> bool | None:
    """tqdm's `disable`: True (no bar), False (forced on) or None (a bar when stderr is a terminal)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value and value not in _ON + _OFF:
        _warn_bad_value(os.environ[ENV])
    if not _process_zero() or value in _OFF:
        return True
    return False if value in _ON else None


@contextlib.contextmanager
def bar(total: float | None = None, desc: str = "", unit: str = "it", **kwargs) -> Iterator[tqdm.tqdm]:
    """A tqdm bar (closed on exit); `unit_scale=True` with unit "B" gives MB/s, GB."""
    with tqdm.tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable(), dynamic_ncols=True,
                   **kwargs) as b:
        if b.disable:
            yield b
            return
        with logging_redirect_tqdm():
            yield b


@contextlib.contextmanager
def tensor_bar(num_tensors: int, total_bytes: int, desc: str, what: str = "tensors"
               ) -> Iterator[Callable[[int], None]]:
    """A bar of bytes (MB/s, ETA) that also counts tensors: call the yielded `done(nbytes)` per tensor."""
    with bar(total_bytes, desc, unit="B", unit_scale=True, unit_divisor=1024) as b:
        count = 0

        def done(nbytes: int) -> None:
            nonlocal count
            count += 1
            b.set_postfix_str(f"{count}/{num_tensors} {what}", refresh=False)
            b.update(nbytes)

        yield done


__all__ = ["ENV", "bar", "disable", "tensor_bar"]
