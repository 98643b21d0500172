"""Writing safetensors files one tensor at a time (the reading side is `safetensors_io.py`).

The header (every tensor's name, dtype, shape and byte range) is written first, from the shapes
the caller declares; the file is then sized and each tensor is written at its offset as it
arrives, in any order. So a 2B model streams from the devices to disk without the whole state
dict (or a second copy of it) ever being in host memory. `close()` fails, naming the tensors,
when a declared tensor was never written; a tensor of the wrong shape or dtype, or one not
declared, fails at `write`.

The layout is the format's: 8-byte little-endian header length, the JSON header (padded with
spaces to a multiple of 8 bytes), then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Iterable, Mapping

import numpy as np

from unialignment_jax.interop.safetensors_io import DTYPES

CODES = {dtype: code for code, dtype in DTYPES.items()}


def dtype_code(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in CODES:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors")
    return CODES[dtype]


class SafetensorsWriter:
    """`with SafetensorsWriter(path, specs, metadata) as w: w.write(key, array) ...`

    `specs` is an ordered iterable of (key, shape, dtype): the file's tensors, in file order.
    `metadata` (str -> str) goes into the header's `__metadata__`.
    """

    def __init__(self, path: str, specs: Iterable[tuple[str, tuple[int, ...], object]],
                 metadata: Mapping[str, str] | None = None):
        self.path = path
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for key, shape, dtype in specs:
            if key in self._layout or key == "__metadata__":
                raise ValueError(f"{path}: tensor {key!r} declared twice")
            dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._layout[key] = (dtype, shape, offset, size)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._total = self._data_start + offset
        self._written: set[str] = set()
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.truncate(self._total)

    def write(self, key: str, array: np.ndarray) -> None:
        if key not in self._layout:
            raise KeyError(f"{self.path}: tensor {key!r} was not declared")
        if key in self._written:
            raise ValueError(f"{self.path}: tensor {key!r} written twice")
        dtype, shape, offset, size = self._layout[key]
        array = np.asarray(array)
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {key!r} is {array.dtype}{list(array.shape)}, "
                             f"declared {dtype}{list(shape)}")
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and sys.byteorder == "big"):
            data = data.byteswap()
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._written.add(key)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        left = [k for k in self._layout if k not in self._written]
        if left:
            raise ValueError(f"{self.path}: {len(left)} declared tensors were never written: "
                             + ", ".join(left[:10]) + (" ..." if len(left) > 10 else ""))

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def save_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """A whole (small) dict of arrays, e.g. the mask-token row."""
    with SafetensorsWriter(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
