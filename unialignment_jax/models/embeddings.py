"""Fixed embeddings: the SD3 2-D sin-cos position table and the sinusoidal timestep features.

Both follow diffusers' formulas exactly (the parity tests compare against them), so that weights
trained here and there see the same positions and timesteps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_table(dim: int, grid_size: int, base_size: int) -> np.ndarray:
    """The (grid_size**2, dim) table of diffusers' `get_2d_sincos_pos_embed` (float64 -> float32).

    Positions are scaled by `base_size / grid_size` (SD3: 64 / 192); the first half of the
    channels encodes the column and the second half the row, token order row-major.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position table needs a width divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size)
    col, row = np.meshgrid(coords, coords, indexing="xy")  # col[i, j] = coords[j]
    # diffusers names these emb_h / emb_w, but its first half encodes the column coordinate.
    return np.concatenate([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], axis=1).astype(np.float32)


def cropped_pos_embed(dim: int, max_size: int, base_size: int, h: int, w: int) -> np.ndarray:
    """Center crop (h*w, dim) of the max_size x max_size table, as SD3's `cropped_pos_embed`."""
    if h > max_size or w > max_size:
        raise ValueError(f"a {h}x{w} token grid exceeds the position table ({max_size}x{max_size}); "
                         "raise model.pos_embed_max_size or lower the resolution")
    table = sincos_table(dim, max_size, base_size).reshape(max_size, max_size, dim)
    top, left = (max_size - h) // 2, (max_size - w) // 2
    return table[top:top + h, left:left + w].reshape(h * w, dim)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
