"""Grain input pipelines: records -> host batches in the format of tasks.py, checkpointable.

  sources (prepared TFDS/ArrayRecord datasets, or the in-memory Shapes world), each:
    MapDataset.source -> this host's shard [i::n] -> seeded shuffle (reshuffled every epoch) -> repeat
  -> weighted mixture of the sources (grain MapDataset.mix)
  -> decode (image bytes -> resize/crop -> [-1, 1]; latents -> float32; texts -> token ids)
  -> to_iter_dataset (decode in `read_threads` threads)
  -> batches of a fixed per-host size; a record that cannot be read or decoded is skipped and
     counted, never a crash (`HostBatchIterator.skipped_records`, logged by the trainer as
     data/skipped_records)
  -> optional worker processes (`worker_count` > 0, mp_prefetch; spawn, so every transform is a
     picklable module-level class)

The iterator is a grain `DatasetIterator`: `get_state()` (a JSON-able dict) / `set_state()` resume
exactly, and it can be checkpointed through Orbax with `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)`. `to_global_batch` turns a host batch into global jax arrays with
`jax.make_array_from_process_local_data` (batch axis over ('data', 'fsdp')).

The parts: data/sources.py (source lists, `config.data` and its defaults), data/decode.py (record
-> example), data/batching.py (Grain datasets and the checkpointable iterator). This module reads a
config: `make_train_iterator(config, task, ...)` / `make_eval_iterator(...)`, `check_data_config`,
and the batch contract on the mesh (`batch_shapes`, `to_global_batch`). Lower level:
`batching.build_dataset` / `batching.make_iterator` over explicit `sources.Source`s (tests,
benchmarks, custom mixtures).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from unialignment_jax.data.batching import HostBatchIterator, make_iterator
from unialignment_jax.data.decode import config_format
from unialignment_jax.data.sources import DATA_DEFAULTS, data_config, task_sources
from unialignment_jax.tasks import IMAGE_PASS_TASKS, check_task, num_conditions


def check_data_config(config, tasks: Sequence[str], splits: Sequence[str] = ("train",),
                      resolutions: Sequence[int] = ()) -> None:
    """Open every source the run will read (metadata only) and check that they fit the config;
    raises ValueError naming the key (config.data.<task>) before anything is written."""
    d = data_config(config)
    unknown = sorted(set(d) - set(DATA_DEFAULTS))
    if unknown:
        raise ValueError(f"config.data.{unknown[0]}: unknown key (known: {', '.join(sorted(DATA_DEFAULTS))})")
    for key in ("worker_count", "worker_buffer_size", "read_threads", "prefetch", "shapes_train_size",
                "shapes_eval_size"):
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "worker_count" else 1):
            raise ValueError(f"config.data.{key} = {v!r}: must be a {'non-negative' if key == 'worker_count' else 'positive'} integer")
    adapter_out = int(config.model.adapter_out)
    for task in dict.fromkeys(tasks):
        check_task(task, "a stage's tasks")
        for split in splits:
            for res in (list(resolutions) or [int(config.input.resolution)]):
                try:
                    sources = task_sources(config, task, split, res)
                    fmt = config_format(config, task, sources, res)
                except (ValueError, FileNotFoundError, OSError) as e:
                    raise ValueError(f"config.data.{task} = {d[task]!r} ({split}): {e}") from None
                if fmt.teacher_dim and fmt.teacher_dim != adapter_out:
                    raise ValueError(f"config.data.{task}: teacher features are {fmt.teacher_dim}-d, but "
                                     f"model.adapter_out = {adapter_out} (set data.teacher=False to train without them)")


def _host_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    return global_batch // process_count


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return int(process_index), int(process_count)


def make_train_iterator(config, task: str, split: str = "train", process_index: int | None = None,
                        process_count: int | None = None, *, batch_size: int | None = None,
                        resolution: int | None = None, seed: int | None = None) -> HostBatchIterator:
    """The trainer's entry point: an endless, shuffled iterator of host batches of `task`.

    batch_size: the global batch (default config.batch_size), split evenly over processes;
    resolution: pixels (default config.input.resolution); process index/count default to jax's.
    Restore a saved position with `it.set_state(state)`."""
    check_task(task)
    process_index, process_count = _process(process_index, process_count)
    d = data_config(config)
    res = int(resolution or config.input.resolution)
    sources = task_sources(config, task, split, res)
    fmt = config_format(config, task, sources, res)
    seed = int(seed if seed is not None else (d["seed"] if d["seed"] >= 0 else config.seed))
    return make_iterator(sources, fmt, _host_batch(int(batch_size or config.batch_size), process_count),
                         seed=seed, shuffle=True, num_epochs=None, process_index=process_index,
                         process_count=process_count, read_threads=int(d["read_threads"]),
                         prefetch=int(d["prefetch"]), worker_count=int(d["worker_count"]),
                         worker_buffer_size=int(d["worker_buffer_size"]))


def make_eval_iterator(config, task: str, split: str = "validation", process_index: int | None = None,
                       process_count: int | None = None, *, batch_size: int | None = None,
                       resolution: int | None = None, drop_remainder: bool = True) -> HostBatchIterator:
    """One pass over `split` in order (no shuffle); every host yields the same number of batches."""
    check_task(task)
    process_index, process_count = _process(process_index, process_count)
    d = data_config(config)
    res = int(resolution or config.input.resolution)
    sources = task_sources(config, task, split, res)
    fmt = config_format(config, task, sources, res)
    return make_iterator(sources, fmt, _host_batch(int(batch_size or config.batch_size), process_count),
                         shuffle=False, num_epochs=1, process_index=process_index, process_count=process_count,
                         drop_remainder=drop_remainder, read_threads=int(d["read_threads"]),
                         prefetch=int(d["prefetch"]))


def measure_throughput(it, seconds: float = 5.0, warmup_batches: int = 1) -> float:
    """Examples/s an iterator delivers (for `bench` and benchmarks/, never for unit tests)."""
    import time

    for _ in range(warmup_batches):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["caption_ids"])
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- global arrays


def batch_sharding(mesh, ndim: int, batch_axes: Sequence[str] = ("data", "fsdp")):
    """NamedSharding of a batch leaf: the leading axis over `batch_axes`, the rest replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(tuple(batch_axes), *([None] * (ndim - 1))))


def to_global_batch(host_batch: Mapping[str, np.ndarray], mesh, batch_axes: Sequence[str] = ("data", "fsdp")):
    """Host batch (this process's rows) -> dict of global jax.Arrays sharded over `batch_axes`
    (`jax.make_array_from_process_local_data`; the global batch is process_count x the host batch)."""
    import jax

    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), batch_axes), np.asarray(v))
            for k, v in host_batch.items()}


def batch_shapes(config, task: str, batch_size: int | None = None, resolution: int | None = None,
                 latent_shape: tuple | None = None, teacher_dim: int | None = None) -> dict[str, tuple]:
    """Shapes of one host-independent (global) batch of `task`: {key: (shape, dtype)} (for AOT)."""
    b = int(batch_size or config.batch_size)
    r = int(resolution or config.input.resolution)
    k = num_conditions(task, int(config.input.num_compose_refs))
    L = int(config.input.text_length)
    out = {}
    if latent_shape:
        out["target_latents"] = ((b, *latent_shape), np.float32)
        if k:
            out["cond_latents"] = ((b, k, *latent_shape), np.float32)
    else:
        out["target"] = ((b, r, r, 3), np.float32)
        if k:
            out["cond"] = ((b, k, r, r, 3), np.float32)
    if task in IMAGE_PASS_TASKS:
        out["prompt_ids"] = ((b, L), np.int32)
    out["caption_ids"] = ((b, L), np.int32)
    out["prefix_len"] = ((b,), np.int32)
    if teacher_dim:
        out["teacher_image"] = ((b, teacher_dim), np.float32)
        out["teacher_text"] = ((b, teacher_dim), np.float32)
    return out


