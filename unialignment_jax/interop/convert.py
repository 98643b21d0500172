"""Tensor conversion between our parameter tree and the official PyTorch state dict, by the name
table in `names.py`. Arrays cross as numpy; one tensor at a time (export never holds two copies of
the model on the host).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from unialignment_jax.interop import names
from unialignment_jax.models import embeddings


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not match the model: the message names every offending tensor."""


def flatten(tree) -> dict[str, object]:
    """Nested dict / nnx.State -> {'a/b/c': leaf}."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _to_numpy(x) -> np.ndarray:
    # np.array (not asarray): a writable copy, so torch.from_numpy does not warn; bfloat16 crosses
    # as float32 (torch cannot take numpy's ml_dtypes bfloat16).
    x = np.array(jax.device_get(x))
    return x.astype(np.float32) if x.dtype != np.float32 else x


@jax.jit
def _take_layer(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def fetch(x, layer: int | None = None) -> np.ndarray:
    """One parameter, or one layer of a stacked one, as a float32 host array gathered from its
    shards. The layer is cut on the devices (one compiled slice per shape, the index traced), so
    only that layer crosses to the host. For arrays spanning several processes every process must
    call this (the gather is a collective)."""
    if isinstance(x, jax.Array):
        if layer is not None:
            x = _take_layer(x, np.int32(layer))
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
    elif layer is not None:
        x = np.asarray(x)[layer]
    return _to_numpy(x)


def iter_official(params, cfg) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, tensor) pairs of the official state dict, streamed one tensor at a time.

    `params` is the model's parameter State (or its flat dict); sharded arrays are gathered one
    row (one layer for block rows) at a time.
    """
    flat = flatten(params)
    rows = names.official_rows(cfg.qk_norm)
    for row in rows:
        if row.ours not in flat:
            raise CheckpointMismatch(f"our parameter {row.ours!r} is missing (model/config mismatch?)")
        x = flat[row.ours]
        layers = range(cfg.num_layers) if row.per_layer else [None]
        for i in layers:
            part = fetch(x, i)
            for key, t in zip(row.torch, names.to_torch(row, part)):
                yield key.format(i=i), t
    table = embeddings.sincos_table(cfg.width, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
    yield names.POS_EMBED_KEY, table[None].copy()


def to_official(params, cfg) -> dict[str, np.ndarray]:
    return dict(iter_official(params, cfg))


def expected_official_shapes(abstract_params, cfg) -> dict[str, tuple[int, ...]]:
    """torch key -> shape, from our abstract (or concrete) parameter shapes."""
    flat = flatten(abstract_params)
    out = {}
    for row in names.official_rows(cfg.qk_norm):
        shape = tuple(flat[row.ours].shape)
        per = shape[1:] if row.per_layer else shape
        for i in (range(cfg.num_layers) if row.per_layer else [None]):
            for key, s in zip(row.torch, names.torch_shapes(row, per)):
                out[key.format(i=i)] = tuple(s)
    out[names.POS_EMBED_KEY] = (1, cfg.pos_embed_max_size**2, cfg.width)
    return out


def check_official(state_dict_shapes: Mapping[str, tuple[int, ...]], abstract_params, cfg,
                   allow_missing: bool = False, allow_unexpected: bool = False, source: str = "checkpoint") -> None:
    """Raise CheckpointMismatch naming every missing, unexpected or mis-shaped tensor."""
    expected = expected_official_shapes(abstract_params, cfg)
    missing = [k for k in expected if k not in state_dict_shapes]
    unexpected = [k for k in state_dict_shapes if k not in expected]
    misshaped = [f"{k}: {tuple(state_dict_shapes[k])} in {source}, model expects {expected[k]}"
                 for k in expected if k in state_dict_shapes and tuple(state_dict_shapes[k]) != expected[k]]
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected and not allow_unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if misshaped:
        problems.append("mis-shaped tensors: " + "; ".join(misshaped[:20]))
    if problems:
        raise CheckpointMismatch(f"{source} does not match the model: " + " | ".join(problems))


def from_official(state_dict: Mapping[str, np.ndarray], abstract_params, cfg, **check_kwargs) -> dict[str, np.ndarray]:
    """Official torch state dict (numpy values) -> {our path: array}, after `check_official`."""
    check_official({k: tuple(v.shape) for k, v in state_dict.items()}, abstract_params, cfg, **check_kwargs)
    flat = flatten(abstract_params)
    out = {}
    for row in names.official_rows(cfg.qk_norm):
        shape = tuple(flat[row.ours].shape)
        layers = range(cfg.num_layers) if row.per_layer else [0]
        if not all(k.format(i=i) in state_dict for k in row.torch for i in layers):
            continue  # allowed missing: the caller keeps its initial value
        if row.per_layer:
            out[row.ours] = np.stack([
                names.from_torch(row, [np.asarray(state_dict[k.format(i=i)]) for k in row.torch], shape[1:])
                for i in range(cfg.num_layers)])
        else:
            out[row.ours] = names.from_torch(row, [np.asarray(state_dict[k]) for k in row.torch], shape)
    return out
