"""Grids of sampled images: the in-training sample hook's and `unialignment sample --prompts`' PNGs."""

from __future__ import annotations

import numpy as np


def enlarge(img: np.ndarray, min_size: int = 128) -> np.ndarray:
    """Nearest-neighbour upscaling by a whole factor to at least `min_size` pixels (small samples
    stay readable in TensorBoard and image viewers)."""
    f = max(1, -(-min_size // img.shape[0]))
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1) if f > 1 else img


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 images (each (n, R, R, 3); rows may be shorter) -> one image."""
    r = rows[0].shape[1]
    n = max(len(x) for x in rows)
    out = np.full((len(rows) * (r + pad) + pad, n * (r + pad) + pad, 3), 64, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[pad + i * (r + pad):pad + i * (r + pad) + r, pad + j * (r + pad):pad + j * (r + pad) + r] = img
    return out


def in_rows(images: np.ndarray, columns: int = 8) -> list[np.ndarray]:
    """(n, R, R, 3) -> rows of up to `columns` images, in order (row-major)."""
    return [images[i:i + columns] for i in range(0, len(images), columns)]


__all__ = ["enlarge", "grid", "in_rows"]
