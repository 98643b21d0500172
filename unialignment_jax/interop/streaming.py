"""Checkpoint -> sharded parameters through a name table, one tensor (slice) at a time.

The rows are `names.Row`s (the same row kinds as the DiT's table: kernel, vector, conv, copy,
split_kernel, split_vector; `{i}` in a per-layer key is the block index of our stacked axis).
Loading first checks the whole checkpoint against the table (every missing, unexpected or
mis-shaped tensor is reported by name, with its file), then builds each parameter with
`jax.make_array_from_callback` on its target sharding: the callback reads, from the memory-mapped
file, only the slice of the torch tensor(s) that the device's shard needs, and converts the layout
on that slice. No parameter is ever materialised whole on one device or, for a sharded
parameter, on the host. A progress bar (`desc`) counts the parameters and bytes placed
(unialignment_jax/progress.py).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from unialignment_jax import progress
from unialignment_jax.interop import names
from unialignment_jax.interop.convert import CheckpointMismatch
from unialignment_jax.interop.safetensors_io import FLOAT_CODES, Checkpoint

Reader = Callable[[tuple[slice, ...]], np.ndarray]


def limit_names(items: list[str], n: int = 20) -> str:
    """The first `n` names, and how many more (error messages)."""
    return ", ".join(items[:n]) + (f" ... ({len(items) - n} more)" if len(items) > n else "")


def mismatch_problems(missing, unexpected, misshaped, bad_dtype) -> list[str]:
    """The parts of a checkpoint-vs-model mismatch message, in one order for every importer."""
    problems = []
    if missing:
        problems.append(f"missing tensors: {limit_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {limit_names(unexpected)}")
    if misshaped:
        problems.append("mis-shaped tensors: " + "; ".join(misshaped[:20]))
    if bad_dtype:
        problems.append("non-float tensors: " + "; ".join(bad_dtype[:20]))
    return problems


def expected_shapes(rows: Iterable[names.Row], flat_abstract: Mapping[str, object],
                    num_layers: int) -> dict[str, tuple[int, ...]]:
    """torch key -> the shape our parameter shapes imply."""
    out = {}
    for row in rows:
        shape = tuple(flat_abstract[row.ours].shape)
        per = shape[1:] if row.per_layer else shape
        for i in (range(num_layers) if row.per_layer else [None]):
            for key, s in zip(row.torch, names.torch_shapes(row, per)):
                out[key.format(i=i)] = tuple(s)
    return out


def check(ckpt: Checkpoint, rows: list[names.Row], flat_abstract: Mapping[str, object], num_layers: int,
          aliases: Mapping[str, tuple[str, ...]] = {}, ignore_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """Compare the checkpoint with the table; returns {expected key: key to read} (aliases resolved).

    `aliases[k]` lists other names a tensor may be stored under (tied copies, e.g. T5's
    `encoder.embed_tokens.weight` for `shared.weight`); keys starting with `ignore_prefixes` are
    skipped. Raises CheckpointMismatch naming every problem.
    """
    missing_ours = sorted({row.ours for row in rows} - set(flat_abstract))
    if missing_ours:
        raise CheckpointMismatch(f"the name table names parameters the model lacks: {limit_names(missing_ours)}")
    expected = expected_shapes(rows, flat_abstract, num_layers)
    key_map, missing, misshaped, bad_dtype = {}, [], [], []
    for key, shape in expected.items():
        found = next((k for k in (key, *aliases.get(key, ())) if k in ckpt), None)
        if found is None:
            missing.append(key)
            continue
        key_map[key] = found
        if ckpt.shape(found) != shape:
            misshaped.append(f"{found}: {list(ckpt.shape(found))} in {ckpt.file_of(found)}, the model expects {list(shape)}")
        elif ckpt.dtype_code(found) not in FLOAT_CODES:
            bad_dtype.append(f"{found}: {ckpt.dtype_code(found)} in {ckpt.file_of(found)}")
    known = set(expected) | {a for k in expected for a in aliases.get(k, ())}
    unexpected = [f"{k} (in {ckpt.file_of(k)})" for k in ckpt.keys()
                  if k not in known and not k.startswith(tuple(ignore_prefixes))]
    # A tied alias stored next to its tensor must agree in shape too.
    for key, found in key_map.items():
        for alias in aliases.get(key, ()):
            if alias != found and alias in ckpt and ckpt.shape(alias) != ckpt.shape(found):
                misshaped.append(f"{alias}: {list(ckpt.shape(alias))} in {ckpt.file_of(alias)}, but its tied "
                                 f"copy {found} is {list(ckpt.shape(found))}")
    problems = mismatch_problems(missing, unexpected, misshaped, bad_dtype)
    if problems:
        raise CheckpointMismatch(f"{ckpt.path} does not match the model: " + " | ".join(problems))
    return key_map


# --------------------------------------------------------------------------------- lazy layouts


def _kernel_view(t: np.ndarray, shape: tuple[int, ...], n_in: int) -> np.ndarray:
    """torch Linear weight (prod(out), prod(in)) as a view of our (*in, *out) kernel (no copy)."""
    n_out = len(shape) - n_in
    v = t.reshape(shape[n_in:] + shape[:n_in])
    return v.transpose(tuple(range(n_out, n_out + n_in)) + tuple(range(n_out)))


def _layer_reader(row: names.Row, tensors: list[np.ndarray], shape: tuple[int, ...]) -> Reader:
    """index (slices in our per-layer layout) -> that slice as numpy, reading only what it needs."""
    kind = row.kind
    if kind == "kernel":
        view = _kernel_view(tensors[0], shape, row.n_in)
    elif kind in ("vector", "copy"):
        view = tensors[0].reshape(shape)
    elif kind == "conv":
        view = tensors[0].transpose(2, 3, 1, 0)
    elif kind == "split_kernel":  # ours (in, n, *out) from n Linear weights
        parts = [_kernel_view(t, (shape[0],) + shape[2:], 1) for t in tensors]
        return lambda idx: np.stack([p[(idx[0],) + idx[2:]] for p in parts[idx[1]]], axis=1)
    elif kind == "split_vector":  # ours (n, *out) from n biases
        parts = [t.reshape(shape[1:]) for t in tensors]
        return lambda idx: np.stack([p[idx[1:]] for p in parts[idx[0]]], axis=0)
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    return lambda idx: view[idx]


def row_reader(ckpt: Checkpoint, row: names.Row, key_map: Mapping[str, str], shape: tuple[int, ...],
               num_layers: int) -> Reader:
    """Reader of our whole parameter (with its leading layer axis for per-layer rows)."""
    def layer(i):
        tensors = [ckpt.array(key_map[k.format(i=i)]) for k in row.torch]
        return _layer_reader(row, tensors, shape[1:] if row.per_layer else shape)

    if not row.per_layer:
        return layer(None)
    layers = [layer(i) for i in range(num_layers)]
    return lambda idx: np.stack([layers[i](idx[1:]) for i in range(*idx[0].indices(num_layers))], axis=0)


def make_sharded(reader: Reader, abstract) -> jax.Array:
    """One parameter on `abstract.sharding`, each device's shard read through `reader`.

    Replicated shards ask for the same slice several times: read each distinct slice once.
    """
    shape, dtype = tuple(abstract.shape), abstract.dtype
    cache: dict[tuple, np.ndarray] = {}

    def callback(index):
        idx = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in cache:
            cache[key] = np.ascontiguousarray(np.asarray(reader(idx)).astype(dtype))
        return cache[key]

    return jax.make_array_from_callback(shape, abstract.sharding, callback)


def stream(ckpt: Checkpoint, rows: list[names.Row], flat_abstract: Mapping[str, object], num_layers: int,
           key_map: Mapping[str, str], desc: str = "import") -> dict[str, jax.Array]:
    """{our path: jax.Array on its sharding} for every row, after `check`."""
    out = {}
    nbytes = lambda a: int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
    total = sum(nbytes(flat_abstract[row.ours]) for row in rows)
    with progress.tensor_bar(len(rows), total, desc, what="parameters") as done:
        for row in rows:
            abstract = flat_abstract[row.ours]
            out[row.ours] = make_sharded(row_reader(ckpt, row, key_map, tuple(abstract.shape), num_layers), abstract)
            done(nbytes(abstract))
    return out


# ------------------------------------------------------------------------ abstract state and merge


def abstract_model(make: Callable[[], nnx.Module], mesh=None, rules=None):
    """(graphdef, abstract State of ShapeDtypeStructs with target shardings) without allocating.

    Without a mesh every parameter targets the first local device.
    """
    if mesh is not None:
        from unialignment_jax.models import create

        return create.abstract_state(make, mesh, rules)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(make))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return graphdef, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), state)


def flat_leaves(state) -> dict[str, object]:
    """{'a/b/c': leaf} of an (abstract) State, paths as in the name tables."""
    pure = nnx.to_pure_dict(state)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        flat["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return flat


def merge_loaded(graphdef, abstract_state, values: Mapping[str, jax.Array]) -> nnx.Module:
    """The module with every parameter taken from `values`; a parameter left out is an error."""
    pure = nnx.to_pure_dict(abstract_state)
    paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    keys = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    left = [k for k in keys if k not in values]
    if left:
        raise CheckpointMismatch(f"no value loaded for parameters: {limit_names(left)} (name table incomplete?)")
    for k, (_, leaf) in zip(keys, paths):
        if tuple(values[k].shape) != tuple(leaf.shape):
            raise CheckpointMismatch(f"{k}: loaded shape {values[k].shape}, the model expects {leaf.shape}")
    loaded = jax.tree_util.tree_unflatten(treedef, [values[k] for k in keys])
    nnx.replace_by_pure_dict(abstract_state, loaded)
    return nnx.merge(graphdef, abstract_state)
