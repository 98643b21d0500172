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

Data config (`config.data`; defaults in DATA_DEFAULTS): per task a source list
"PATH[:WEIGHT],PATH[:WEIGHT],..." where PATH is a prepared dataset directory (it may hold `{split}`,
replaced by the split name) or `shapes` (the Shapes world, generated on the fly). WEIGHT is a
positive number (default 1), or `size` on every source of the list: each source then weighs its
record count, so the mixture draws every source in proportion to its size, as a shuffle of the
sources' concatenation does (the official loader's edit + perception dataset). Edit and
perception records are alike (tasks.record_family): either task's datasets may feed the other.

Reading a config: `make_train_iterator(config, task, ...)` / `make_eval_iterator(...)`. Lower level:
`build_dataset` / `make_iterator` over explicit `Source`s (tests, benchmarks, custom mixtures).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from unialignment_jax import paths
from unialignment_jax.data import images as image_lib
from unialignment_jax.data.records import RecordSpec, open_prepared, text
from unialignment_jax.tasks import IMAGE_PASS_TASKS, check_task, num_conditions, record_family

log = logging.getLogger(__name__)

DATA_DEFAULTS = dict(
    t2i="shapes", edit="shapes", perception="shapes", compose="shapes", caption="shapes", vqa="shapes",
    seed=-1,  # shuffle seed; -1: config.seed
    worker_count=0,  # grain worker processes per host (0: decode in this process's threads)
    worker_buffer_size=2,  # batches buffered per worker
    read_threads=8,  # threads that read + decode records
    prefetch=32,  # records decoded ahead per host
    shapes_seed=0,  # the Shapes world's generator seed
    shapes_train_size=1_000_000,  # examples in the Shapes train split (generated on the fly)
    shapes_eval_size=512,  # examples in the Shapes validation / test splits
    teacher=True,  # put teacher features in batches when every source of a task has them
)


def data_config(config) -> dict[str, Any]:
    """DATA_DEFAULTS overridden by `config.data` (when the config has that section)."""
    out = dict(DATA_DEFAULTS)
    section = config.get("data") if hasattr(config, "get") else None
    if section is not None:
        out.update({k: section[k] for k in section.keys()})
    return out


# ---------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Bad:
    """Marker for a record that could not be read or decoded (skipped and counted)."""

    reason: str


class SafeSource:
    """A random-access source whose failing reads return `Bad` instead of raising."""

    def __init__(self, source, name: str):
        self.source, self.name = source, name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.source[index]
        except Exception as e:  # a corrupt record must not stop training
            return Bad(f"{self.name}[{index}]: unreadable record ({type(e).__name__}: {e})")

    def __repr__(self) -> str:
        return f"SafeSource({self.name})"


@dataclasses.dataclass
class Source:
    """One dataset of a mixture: a random-access source, its RecordSpec, a weight and a name."""

    source: Any
    spec: RecordSpec
    weight: float = 1.0
    name: str = ""


SIZE_WEIGHT = "size"  # a source-list weight: the source's record count (see the module docstring)


def prepared_source(path: str, split: str, weight: float | str = 1.0) -> Source:
    """A dataset written by `unialignment prepare` (`path` may hold `{split}`); weight `size`:
    the split's record count."""
    path = path.replace("{split}", split)
    builder, spec = open_prepared(path)
    if split not in builder.info.splits:
        raise ValueError(f"{path}: no split {split!r} (it has {sorted(builder.info.splits)})")
    source = builder.as_data_source(split=split)
    return Source(source, spec, float(len(source)) if weight == SIZE_WEIGHT else weight, f"{path}[{split}]")


def shapes_source(task: str, split: str, resolution: int, num_compose_refs: int, teacher_dim: int,
                  size: int, seed: int = 0, weight: float = 1.0) -> Source:
    from unialignment_jax.data.shapes import ShapesSource

    src = ShapesSource(task, split, size, resolution, num_compose_refs, teacher_dim, seed)
    spec = RecordSpec(task=task, num_cond=src.num_cond, storage="encoded", resolution=resolution,
                      teacher="shapes" if teacher_dim else "", teacher_dim=teacher_dim)
    return Source(src, spec, weight, f"shapes/{task}/{split}")


def parse_source_list(text_spec: str) -> list[tuple[str, float | str]]:
    """'a:2,b' -> [('a', 2.0), ('b', 1.0)]; 'a:size,b:size' -> [('a', 'size'), ('b', 'size')]."""
    out = []
    for item in (s.strip() for s in text_spec.split(",")):
        if not item:
            continue
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and tail.strip() == SIZE_WEIGHT:
            path, weight = head, SIZE_WEIGHT
        elif sep:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if weight != SIZE_WEIGHT and weight <= 0:
            raise ValueError(f"data source {item!r}: weights must be positive")
        out.append((path, weight))
    if not out:
        raise ValueError(f"empty data source list {text_spec!r}")
    by_size = [w == SIZE_WEIGHT for _, w in out]
    if any(by_size) and not all(by_size):
        raise ValueError(f"data source list {text_spec!r}: weight every source by `{SIZE_WEIGHT}` or none "
                         "(a size-weighted mixture draws each source in proportion to its record count)")
    return out


def absolute_source_list(text_spec: str) -> str:
    """The same source list with every dataset directory made absolute (`paths.absolute`), so a
    run's config.json names its data wherever a later command starts; "shapes" is kept."""
    items = []
    for path, weight in parse_source_list(text_spec):
        path = path if path == "shapes" else paths.absolute(path)
        if weight == 1.0:
            items.append(path)
        else:
            items.append(f"{path}:{weight}" if weight == SIZE_WEIGHT else f"{path}:{weight:g}")
    return ",".join(items)


# ---------------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
    """What one example of a task looks like in a batch (shared by all sources of a mixture)."""

    task: str
    num_cond: int
    resolution: int
    text_length: int
    latents: bool  # target_latents / cond_latents instead of target / cond pixels
    latent_shape: tuple | None
    teacher_dim: int  # 0: no teacher features
    tokenizer: tuple  # config.tokenizer as sorted (key, value) items (hashable, picklable)
    max_image_pixels: int = image_lib.DEFAULT_MAX_PIXELS
    caption_prompt: str = ""  # input.caption_prompt: the caption task's given question ("" = none)


def example_format(task: str, specs: Sequence[RecordSpec], resolution: int, text_length: int,
                   tokenizer_cfg: Mapping, use_teacher: bool = True, caption_prompt: str = "") -> ExampleFormat:
    """The common format of the sources of one task; raises ValueError on incompatible sources."""
    k = {s.num_cond for s in specs}
    if any(record_family(s.task) != record_family(task) for s in specs) or len(k) != 1:
        raise ValueError(f"task {task}: sources hold {[s.task for s in specs]} records with {sorted(k)} "
                         "condition images")
    latents = {s.has_latents and not s.has_images for s in specs}
    if len(latents) != 1:
        raise ValueError(f"task {task}: mixing sources with latents and sources with images only")
    latents = latents.pop()
    shape = None
    if latents:
        shapes = {tuple(s.latent_shape) for s in specs}
        if len(shapes) != 1:
            raise ValueError(f"task {task}: sources have different latent shapes {sorted(shapes)}")
        shape = shapes.pop()
        bad = [s.resolution for s in specs if s.resolution != resolution]
        if bad:
            raise ValueError(f"task {task}: latents were prepared at {bad[0]} px, the run trains at {resolution} px")
    dims = {s.teacher_dim if s.has_teacher else 0 for s in specs}
    teacher_dim = dims.pop() if (use_teacher and len(dims) == 1) else 0
    if use_teacher and len(dims) > 1:
        log.warning("task %s: not every source has teacher features of one size (%s); batches carry none",
                    task, sorted(dims))
    tok_dict = tokenizer_cfg.to_dict() if hasattr(tokenizer_cfg, "to_dict") else dict(tokenizer_cfg)
    tok = tuple(sorted(tok_dict.items()))
    return ExampleFormat(task, k.pop(), resolution, text_length, latents, shape, teacher_dim, tok,
                         caption_prompt=caption_prompt if task == "caption" else "")


def config_format(config, task: str, sources, resolution: int) -> ExampleFormat:
    """`example_format` of a run's config for `task`'s sources (text length, tokenizer, teacher
    features, caption prompt from the config)."""
    return example_format(task, [s.spec for s in sources], resolution, int(config.input.text_length),
                          config.tokenizer, bool(data_config(config)["teacher"]),
                          caption_prompt=str(config.input.get("caption_prompt", "")))


_TOKENIZERS: dict = {}
_TOKENIZERS_LOCK = threading.Lock()


def _tokenizer(items: tuple):
    """The tokenizer of config.tokenizer `items`, built once per process (workers build their own)."""
    with _TOKENIZERS_LOCK:
        if items not in _TOKENIZERS:
            from unialignment_jax.data.tokenizers import build_tokenizer

            _TOKENIZERS[items] = build_tokenizer(dict(items))
        return _TOKENIZERS[items]


def _num_tokens(tok, ids: np.ndarray) -> int:
    """Tokens up to and including the first EOS (all of them if truncated without one)."""
    eos = np.flatnonzero(ids == tok.eos_id)
    return int(eos[0]) + 1 if eos.size else len(ids)


def tokenize_vqa(tok, question: str, answer: str, length: int) -> tuple[np.ndarray, int]:
    """Question tokens with their EOS (the given prefix), then the answer tokens with EOS, EOS-padded
    to `length`: ((length,) int32 ids, prefix length). When both do not fit, the answer keeps up to
    half the length and the question is truncated (keeping its EOS)."""
    if length < 2:
        raise ValueError(f"text_length {length}: vqa needs room for a question and an answer")
    answer_len = _num_tokens(tok, tok.encode([answer], length)[0])
    q = tok.encode([question], length - min(answer_len, length // 2))[0]
    n = _num_tokens(tok, q)
    a = tok.encode([answer], length - n)[0]
    return np.concatenate([q[:n], a]).astype(np.int32), n


class DecodeExample:
    """record (data/records.py) -> one example of the batch format (tasks.py), or Bad.

    Pixels stay uint8 here (PIXEL_KEYS); `stack_examples` makes the batch's float32 [-1, 1]."""

    def __init__(self, fmt: ExampleFormat):
        self.fmt = fmt

    def _pixels(self, x) -> np.ndarray:
        """uint8 (R, R, 3); converted to float32 [-1, 1] per batch (`stack_examples`), which writes
        each float32 pixel once instead of per example and again when stacking."""
        return image_lib.to_pixels(x, self.fmt.resolution, self.fmt.max_image_pixels)

    def _array(self, x, shape, name) -> np.ndarray:
        a = np.asarray(x)
        if a.shape != tuple(shape):
            raise ValueError(f"{name} of shape {a.shape}, expected {tuple(shape)}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds non-finite values")
        return a

    def __call__(self, rec):
        if isinstance(rec, Bad):
            return rec
        try:
            return self._decode(rec)
        except Exception as e:  # corrupt bytes, wrong shapes, bad text: skip and count
            return Bad(f"{text(rec.get('key', '?')) if isinstance(rec, Mapping) else '?'}: "
                       f"{type(e).__name__}: {e}")

    def _decode(self, rec) -> dict[str, np.ndarray]:
        f, k = self.fmt, self.fmt.num_cond
        out: dict[str, np.ndarray] = {}
        if f.latents:
            out["target_latents"] = self._array(rec["target_latents"], f.latent_shape, "target_latents")
            if k:
                out["cond_latents"] = self._array(rec["cond_latents"], (k, *f.latent_shape), "cond_latents")
        else:
            out["target"] = self._pixels(rec["target_image"])
            if k:
                conds = rec["cond_images"]
                if len(conds) != k:
                    raise ValueError(f"{len(conds)} condition images, expected {k}")
                out["cond"] = np.stack([self._pixels(c) for c in conds])
        tok = _tokenizer(f.tokenizer)
        caption = text(rec["caption"])
        if not caption.strip():
            raise ValueError("empty caption")
        if f.task in IMAGE_PASS_TASKS:
            prompt = caption if f.task == "t2i" else text(rec["instruction"])
            if not prompt.strip():
                raise ValueError("empty instruction")
            out["prompt_ids"] = tok.encode([prompt], f.text_length)[0].astype(np.int32)
        if f.task == "vqa" or f.caption_prompt:  # a given question, then the answer / caption
            question = text(rec["question"]) if f.task == "vqa" else f.caption_prompt
            ids, n = tokenize_vqa(tok, question, caption, f.text_length)
            out["caption_ids"], out["prefix_len"] = ids, np.int32(n)
        else:
            out["caption_ids"] = tok.encode([caption], f.text_length)[0].astype(np.int32)
            out["prefix_len"] = np.int32(0)
        if f.teacher_dim:
            out["teacher_image"] = self._array(rec["teacher_image"], (f.teacher_dim,), "teacher_image")
            out["teacher_text"] = self._array(rec["teacher_text"], (f.teacher_dim,), "teacher_text")
        return out


# ---------------------------------------------------------------------------------- batching


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

    def metrics(self) -> dict[str, int]:
        return {"data/skipped_records": int(self.skipped_records)}


# ---------------------------------------------------------------------------------- building


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


def task_sources(config, task: str, split: str, resolution: int | None = None) -> list[Source]:
    """The sources of `task` named by config.data.<task> (see the module docstring)."""
    d = data_config(config)
    res = int(resolution or config.input.resolution)
    out = []
    for path, weight in parse_source_list(str(d[task])):
        if path == "shapes":
            size = d["shapes_train_size"] if split == "train" else d["shapes_eval_size"]
            teacher_dim = int(config.model.adapter_out) if d["teacher"] else 0
            out.append(shapes_source(task, split, res, int(config.input.num_compose_refs), teacher_dim,
                                     int(size), int(d["shapes_seed"]),
                                     float(size) if weight == SIZE_WEIGHT else weight))
        else:
            out.append(prepared_source(path, split, weight))
    return out


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


__all__ = ["DATA_DEFAULTS", "data_config", "Source", "prepared_source", "shapes_source", "parse_source_list",
           "SIZE_WEIGHT", "ExampleFormat", "example_format", "config_format", "DecodeExample", "Bad", "SafeSource",
           "build_dataset", "make_iterator", "make_train_iterator", "make_eval_iterator", "HostBatchIterator", "shard",
           "to_global_batch", "batch_sharding", "batch_shapes", "task_sources", "tokenize_vqa", "check_data_config",
           "measure_throughput"]
