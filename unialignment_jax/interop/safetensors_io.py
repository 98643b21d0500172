"""Reading safetensors checkpoints lazily: one file, or several shards behind an index json.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range) and the raw little-endian tensor bytes. We parse the header ourselves and memory-map the
data, so that (a) a slice of a tensor reads only the pages it touches (a host never holds more than
the slices its devices need: T5-XXL does not fit on one device), and (b) bfloat16 tensors read as
`ml_dtypes.bfloat16` numpy arrays (the `safetensors` package's numpy backend cannot represent
bfloat16). Nothing here unpickles anything.

Paths may be URIs (`gs://...`, through etils epath; unialignment_jax/paths.py). A bucket object
cannot be memory-mapped, so a remote file's header is read with one ranged read and each tensor,
when asked for, with another: tensor by tensor, without a local copy of the file (the host then
holds whole tensors rather than the slices its devices need).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np
from etils import epath

from unialignment_jax import paths

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_MAX_HEADER = 100 * 2**20


class CheckpointFormatError(ValueError):
    """A file that is not a readable safetensors checkpoint; the message names the file."""


def read_json(path: str) -> dict:
    """A checkpoint's json file (config.json, an index), local or remote; CheckpointFormatError
    naming the file when it cannot be read or parsed."""
    try:
        with paths.open_file(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: cannot read ({e})") from None


class SafetensorsFile:
    """The tensors of one `.safetensors` file, read on demand through a memory map."""

    def __init__(self, path: str):
        self.path = path
        self._remote = paths.is_remote(path)
        try:
            with paths.open_file(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise CheckpointFormatError(f"{path}: too short for a safetensors file")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER:
                    raise CheckpointFormatError(f"{path}: header of {n} bytes; not a safetensors file")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{path}: cannot read a safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + n
        size = epath.Path(path).stat().length if self._remote else os.path.getsize(path)
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if code not in DTYPES:
                raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype {code}")
            if end - begin != math.prod(shape) * DTYPES[code].itemsize or self._data_start + end > size:
                raise CheckpointFormatError(f"{path}: tensor {key!r}: byte range {begin}..{end} does not hold "
                                            f"{code}{list(shape)} (truncated or corrupt file)")
            self.entries[key] = (code, shape, begin, end)
        self._map = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def array(self, key: str) -> np.ndarray:
        """A read-only numpy view of the tensor (memory-mapped: nothing is read until indexed)."""
        code, shape, begin, end = self.entries[key]
        if self._remote:  # one ranged read of this tensor's bytes (read-only, as the memory map)
            try:
                with paths.open_file(self.path, "rb") as f:
                    f.seek(self._data_start + begin)
                    raw = f.read(end - begin)
            except OSError as e:
                raise CheckpointFormatError(f"{self.path}: cannot read tensor {key!r} ({e})") from None
            if len(raw) != end - begin:
                raise CheckpointFormatError(f"{self.path}: tensor {key!r}: read {len(raw)} of {end - begin} bytes "
                                            "(truncated file?)")
            return np.frombuffer(raw, DTYPES[code]).reshape(shape)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        return self._map[start:start + (end - begin)].view(DTYPES[code]).reshape(shape)


class Checkpoint:
    """A checkpoint's tensors by name, whether in one file or sharded with an index json.

    `path` is a `.safetensors` file, an `*.index.json` file, or a directory holding one of
    `file_names` (or its `.index.json`, which wins when both exist).
    """

    def __init__(self, path: str, file_names: Iterable[str] = ("model.safetensors",)):
        file_names = tuple(file_names)
        if paths.is_dir(path):
            candidates = [paths.join(path, n + ".index.json") for n in file_names]
            candidates += [paths.join(path, n) for n in file_names]
            found = [c for c in candidates if paths.is_file(c)]
            if not found:
                expected = ", ".join(f"{n} or {n}.index.json" for n in file_names)
                raise FileNotFoundError(f"{path}: no safetensors checkpoint here (expected {expected})")
            path = found[0]
        elif not paths.is_file(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
        self.path = path
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if path.endswith(".json"):
            self._read_index(path)
        elif path.endswith(".safetensors"):
            f = self._open(path)
            self._where = {k: path for k in f.keys()}
        else:
            raise CheckpointFormatError(f"{path}: expected a .safetensors file or an .index.json (pickle "
                                        "checkpoints are not read; convert them to safetensors)")

    def _open(self, path: str) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def _read_index(self, index_path: str) -> None:
        try:
            with paths.open_file(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{index_path}: not a safetensors index ({e!r})") from None
        root = paths.parent(index_path)
        checked: dict[str, bool] = {}
        for key, name in weight_map.items():
            shard = paths.join(root, name)
            if shard not in checked:  # (one existence check per shard: a bucket round trip each)
                checked[shard] = paths.is_file(shard)
            if not checked[shard]:
                raise FileNotFoundError(f"{index_path}: tensor {key!r} is in {name}, which does not exist")
            if key not in self._open(shard).entries:
                raise CheckpointFormatError(f"{index_path}: tensor {key!r} is listed in {name} but that file lacks it")
            self._where[key] = shard

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> str:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._open(self._where[key]).entries[key][1]

    def dtype_code(self, key: str) -> str:
        return self._open(self._where[key]).entries[key][0]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._where}

    def array(self, key: str) -> np.ndarray:
        return self._open(self._where[key]).array(key)
