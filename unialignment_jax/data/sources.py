"""Data sources of a run: the per-task source lists of `config.data`, prepared datasets, the
Shapes world, and the `Bad` marker of records that cannot be read.

Data config (`config.data`; defaults in DATA_DEFAULTS): per task a source list
"PATH[:WEIGHT],PATH[:WEIGHT],..." where PATH is a prepared dataset directory (it may hold `{split}`,
replaced by the split name) or `shapes` (the Shapes world, generated on the fly). WEIGHT is a
positive number (default 1), or `size` on every source of the list: each source then weighs its
record count, so the mixture draws every source in proportion to its size, as a shuffle of the
sources' concatenation does (the official loader's edit + perception dataset). Edit and
perception records are alike (tasks.record_family): either task's datasets may feed the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unialignment_jax import paths
from unialignment_jax.data.records import RecordSpec, open_prepared
from unialignment_jax.data.shapes_tasks import ShapesSource

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

