"""Time grids of the two samplers (docs/method.md, "Sampling"), computed on the host with the official arithmetic.

Image (flow matching): diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(N)` without dynamic
shifting, which is what the official pipeline runs:
  * at construction the scheduler shifts its 1000 training sigmas (t / 1000, t = 1000 ... 1) in float32
    and keeps `sigma_max` = 1 and `sigma_min` = shift(0.001);
  * `set_timesteps` takes `linspace(1000 sigma_max, 1000 sigma_min, N) / 1000` in float64 and applies
    the shift *again* (so the last sigma is shift(shift(0.001)): 0.0089 at shift 3, a diffusers
    quirk kept for parity), casts to float32, and appends a terminal 0.
  * the model's timestep is `1000 sigma` (float32).
The official checkpoints sample with SD3's scheduler config (shift 3.0); training uses shift 1.

Text (masked diffusion, `ddpm_cache`): `linspace(1, eps, N + 1)` with eps = 1e-5 and
`dt = (1 - eps) / N`; step i moves from t_i to t_i - dt.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0  # SD3-medium's scheduler config (the official checkpoints' scheduler)
TEXT_EPS = 1e-5


def _shift32(sigma: np.ndarray, shift: float) -> np.ndarray:
    s = np.float32(shift)
    return (s * sigma / (np.float32(1.0) + (s - np.float32(1.0)) * sigma)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _flow_sigmas(num_steps: int, shift: float) -> np.ndarray:
    n = NUM_TRAIN_TIMESTEPS
    train = (np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)).astype(np.float32)
    train = _shift32(train, shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n  # float64, as set_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    out = np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])
    out.setflags(write=False)
    return out


def flow_sigmas(num_steps: int, shift: float = DEFAULT_SHIFT) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas, decreasing from 1 to the last step's sigma, then 0."""
    if int(num_steps) < 1:
        raise ValueError(f"steps = {num_steps}: the image sampler needs at least one step")
    if shift <= 0:
        raise ValueError(f"shift = {shift}: the timestep shift must be positive")
    return _flow_sigmas(int(num_steps), float(shift))


def flow_timesteps(sigmas: np.ndarray) -> np.ndarray:
    """The model's timestep input per step, `1000 sigma` (float32), without the terminal 0."""
    return (np.asarray(sigmas[:-1], np.float32) * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)


def text_times(num_steps: int, eps: float = TEXT_EPS) -> tuple[np.ndarray, float]:
    """(linspace(1, eps, N + 1) as float32, dt = (1 - eps) / N)."""
    if int(num_steps) < 1:
        raise ValueError(f"steps = {num_steps}: the text sampler needs at least one step")
    return np.linspace(1.0, eps, int(num_steps) + 1).astype(np.float32), (1.0 - eps) / int(num_steps)
