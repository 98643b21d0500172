"""Grain batching: sources -> this host's shard -> shuffle -> repeat -> mixture -> decode -> batches
of good examples (a `Bad` record is skipped and counted), optionally in worker processes; the
checkpointable `HostBatchIterator` the trainer reads (`get_state()` / `set_state()`)."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import grain
import numpy as np

from unialignment_jax.data.decode import DecodeExample, ExampleFormat
from unialignment_jax.data.sources import Bad, SafeSource, Source

log = logging.getLogger(__name__)


SKIPPED_KEY = "_skipped"  # per-batch count of skipped records; removed by HostBatchIterator
PIXEL_KEYS = ("target", "cond")  # uint8 in examples, float32 in [-1, 1] in batches


def stack_examples(items: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack examples into a batch; uint8 pixels become float32 in [-1, 1] (one pass, no temporary)."""
    batch = {}
    for key in items[0]:
        if key in PIXEL_KEYS and items[0][key].dtype == np.uint8:
            out = np.empty((len(items), *items[0][key].shape), np.float32)
            for i, x in enumerate(items):
                np.multiply(x[key], np.float32(1.0 / 127.5), out=out[i], dtype=np.float32)
            out -= np.float32(1.0)
            batch[key] = out
        else:
            batch[key] = np.stack([x[key] for x in items])
    return batch


class SkipBadBatchDataset(grain.IterDataset):
    """Batches `batch_size` good examples; `Bad` markers are skipped and counted in each batch's
    SKIPPED_KEY. With `drop_remainder=False` the last batch may be smaller."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool = True):
        super().__init__(parent)
        self.batch_size, self.drop_remainder = batch_size, drop_remainder

    def __iter__(self):
        return _SkipBadBatchIterator(self._parent.__iter__(), self.batch_size, self.drop_remainder)

    def __str__(self) -> str:
        return f"SkipBadBatchDataset(batch_size={self.batch_size})"


class _SkipBadBatchIterator(grain.DatasetIterator):
    _WARN_FIRST = 20

    def __init__(self, parent, batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self.batch_size, self.drop_remainder = batch_size, drop_remainder
        self._warned = 0
        self.trailing_skipped = 0  # bad records met after the last batch of a finite pass

    def __next__(self):
        items, skipped = [], 0
        while len(items) < self.batch_size:
            try:
                x = next(self._parent)
            except StopIteration:
                if items and not self.drop_remainder:
                    break
                self.trailing_skipped += skipped
                raise
            if isinstance(x, Bad):
                skipped += 1
                if self._warned < self._WARN_FIRST:
                    self._warned += 1
                    log.warning("skipping a corrupt record: %s", x.reason)
                continue
            items.append(x)
        batch = stack_examples(items)
        batch[SKIPPED_KEY] = np.int64(skipped)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class HostBatchIterator(grain.DatasetIterator):
    """The iterator the trainer reads: host batches (dict of numpy arrays, tasks.py format).

    `skipped_records` counts corrupt records skipped so far (it is part of the state);
    `get_state()` / `set_state()` resume exactly (JSON-able dict)."""

    def __init__(self, inner, task: str, batch_size: int, worker_count: int = 0):
        super().__init__(inner)
        self.task, self.batch_size, self.worker_count = task, batch_size, worker_count
        self.skipped_records = 0

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = dict(next(self._parent))
        except StopIteration:
            # the end of a finite pass: count bad records after the last batch (visible in-process;
            # with worker processes they are not, and training iterators never end)
            inner = self._parent
            if isinstance(inner, _SkipBadBatchIterator):
                self.skipped_records += inner.trailing_skipped
                inner.trailing_skipped = 0
            raise
        self.skipped_records += int(batch.pop(SKIPPED_KEY, 0))
        return batch

    def get_state(self) -> dict:
        return {"pipeline": self._parent.get_state(), "skipped_records": int(self.skipped_records),
                "worker_count": int(self.worker_count)}

    def set_state(self, state: dict) -> None:
        saved = int(state.get("worker_count", 0))
        if saved != self.worker_count:
            raise ValueError(f"the data-iterator state was saved with {saved} worker processes, this pipeline "
                             f"has {self.worker_count}: resume with the same data.worker_count")
        self._parent.set_state(state["pipeline"])
        self.skipped_records = int(state.get("skipped_records", 0))


def shard(ds: grain.MapDataset, process_index: int, process_count: int, even: bool = False) -> grain.MapDataset:
    """This host's records: indices i, i + n, i + 2n, ... (disjoint across hosts, covering the data;
    `even` drops the last len % n records so every host has the same count)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    if even:
        ds = ds[: len(ds) - len(ds) % process_count]
    return ds[process_index::process_count]


def build_dataset(sources: Sequence[Source], fmt: ExampleFormat, batch_size: int, *, seed: int = 0,
                  shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                  process_count: int = 1, drop_remainder: bool = True, read_threads: int = 8,
                  prefetch: int = 32, worker_count: int = 0, worker_buffer_size: int = 2) -> grain.IterDataset:
    """The grain IterDataset of host batches (with the SKIPPED_KEY count) for `sources`."""
    if batch_size <= 0:
        raise ValueError(f"per-host batch size {batch_size}: must be positive")
    parts = []
    for i, src in enumerate(sources):
        ds = grain.MapDataset.source(SafeSource(src.source, src.name or f"source{i}"))
        ds = shard(ds, process_index, process_count, even=num_epochs is not None)
        if len(ds) == 0:
            raise ValueError(f"{src.name}: no records for process {process_index} of {process_count}")
        if shuffle:
            ds = ds.shuffle(seed=seed * 1000 + i)
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in sources])
    ds = ds.map(DecodeExample(fmt))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    it = SkipBadBatchDataset(it, batch_size, drop_remainder)
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer_size))
    return it


def make_iterator(sources: Sequence[Source], fmt: ExampleFormat, batch_size: int, **kw) -> HostBatchIterator:
    """A HostBatchIterator over `build_dataset(sources, fmt, batch_size, **kw)`."""
    return HostBatchIterator(iter(build_dataset(sources, fmt, batch_size, **kw)), fmt.task, batch_size,
                             int(kw.get("worker_count", 0)))

