"""FLOPs utilisation: analytic step FLOPs / step time / (devices x per-device peak).

The peak is the chip's dense bf16 matmul rate from a table for known accelerators, and on the CPU
(or an unknown device) a 2048^3 float32 matmul timed in this process at start-up, so that MFU on
a CPU run is a ratio to what this machine's XLA can actually do.
"""

from __future__ import annotations

import logging
import statistics
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (vendor figures), matched by substring of device_kind.
PEAK_BF16 = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def median_seconds(fn, *args, steps: int = 3) -> float:
    """Median wall time of `fn(*args)` over `steps` calls after one warm-up call, each blocked on."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(n: int = 2048, steps: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n^3 matmul on one device, timed in this process."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    return 2 * n**3 / median_seconds(jax.jit(jnp.matmul), a, b, steps=steps)


def device_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from)."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16:
        if name.lower() in kind.lower():
            return peak, f"table ({kind}, bf16 dense)"
    peak = matmul_peak_flops()
    logging.info("MFU peak: measured %.1f GFLOP/s per device (%s, 2048^3 float32 matmul)", peak / 1e9, kind)
    return peak, f"measured ({kind}, 2048^3 float32 matmul)"
