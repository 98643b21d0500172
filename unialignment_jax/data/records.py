"""The record schema: what one prepared training example holds, for every task.

A prepared dataset (`unialignment prepare`, data/prepare.py) is a TFDS dataset in ArrayRecord
format whose examples are flat dicts with the fields below; the Grain pipeline (data/pipeline.py)
turns them into the batch format of tasks.py. The Shapes world (data/shapes.py) produces the same
dicts in memory, with images as uint8 arrays instead of encoded bytes.

  field            present for                    storage (TFDS feature)          meaning
  schema_version   all                            int32 scalar                    SCHEMA_VERSION
  key              all                            text                            "<manifest>:<line>" (source row)
  caption          all                            text                            text-pass target: the caption
                                                                                  (the answer for vqa); the
                                                                                  image-pass prompt for t2i
  instruction      all (empty for t2i/cap/vqa)    text                            edit/perception/compose text
  question         all (empty unless vqa)         text                            vqa question (given prefix)
  target_image     images stored                  bytes (PNG/JPEG)                the image the task produces
                                                                                  (t2i/edit/..) or reads (cap/vqa)
  cond_images      images stored, K > 0           K x bytes                       source image (K=1) / references
  target_latents   latents stored                 float16|float32 (h, w, C)       codec latents of target_image
  cond_latents     latents stored, K > 0          float16|float32 (K, h, w, C)    codec latents of cond_images
  teacher_image    teacher features               float16 (D,)                    frozen teacher, target image
  teacher_text     teacher features               float16 (D,)                    frozen teacher, caption

K = tasks.num_conditions(task, num_compose_refs). Encoded images are stored as raw bytes (TFDS object
tensors), not as `tfds.features.Image`: the pipeline decodes, resizes and skips corrupt bytes itself
(TFDS's Image feature would decode inside the data source, where a corrupt record cannot be skipped,
and its numpy decoder rejects nested `SkipDecoding`).

The dataset-level description (`RecordSpec`: task, K, storage, latent shape, codec, teacher, resolution)
is stored in the TFDS metadata (`metadata.json`), so a reader needs no builder class:
`open_prepared(dir)` returns the spec and the TFDS builder.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from unialignment_jax.tasks import TASKS, check_task

SCHEMA_VERSION = 1
TEXT_FIELDS = ("key", "caption", "instruction", "question")
IMAGE_STORAGE = ("encoded", "latents", "both")
LATENT_DTYPES = ("float16", "float32")


class RecordError(ValueError):
    """A record that does not match its spec (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """What every record of one prepared dataset holds (stored in the dataset's metadata)."""

    task: str
    num_cond: int = 0  # condition images per example (K)
    storage: str = "encoded"  # encoded | latents | both
    resolution: int = 0  # pixels of the stored images (0: images kept at their own size)
    latent_shape: tuple[int, ...] | None = None  # (h, w, C) when latents are stored
    latent_dtype: str = "float16"
    codec: Mapping[str, Any] | None = None  # codec config the latents were made with
    teacher: str = ""  # '' | qwen | siglip | shapes
    teacher_dim: int = 0
    image_format: str = "auto"  # how re-encoded images were written (png | jpeg | auto=keep source)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        check_task(self.task, "RecordSpec.task")
        if self.storage not in IMAGE_STORAGE:
            raise RecordError(f"RecordSpec.storage = {self.storage!r}: choose one of {IMAGE_STORAGE}")
        if self.has_latents and (self.latent_shape is None or len(self.latent_shape) != 3):
            raise RecordError("RecordSpec.latent_shape: latents need an (h, w, C) shape")
        if self.latent_dtype not in LATENT_DTYPES:
            raise RecordError(f"RecordSpec.latent_dtype = {self.latent_dtype!r}: choose one of {LATENT_DTYPES}")
        if self.teacher and self.teacher_dim <= 0:
            raise RecordError("RecordSpec.teacher_dim: teacher features need a positive dimension")

    @property
    def has_images(self) -> bool:
        return self.storage in ("encoded", "both")

    @property
    def has_latents(self) -> bool:
        return self.storage in ("latents", "both")

    @property
    def has_teacher(self) -> bool:
        return bool(self.teacher)

    # ------------------------------------------------------------------ (de)serialization

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_shape"] = list(self.latent_shape) if self.latent_shape else None
        d["codec"] = dict(self.codec) if self.codec else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RecordSpec":
        d = dict(d)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RecordError(f"schema_version {version!r} is not supported (this code reads {SCHEMA_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecordError(f"unknown record-spec fields {unknown}")
        if d.get("latent_shape") is not None:
            d["latent_shape"] = tuple(int(x) for x in d["latent_shape"])
        return cls(**d)

    # ------------------------------------------------------------------ TFDS features

    def tfds_features(self):
        """The `tfds.features.FeaturesDict` of this spec (imports tensorflow_datasets, not TF)."""
        import tensorflow_datasets as tfds

        f = tfds.features
        feats: dict[str, Any] = {"schema_version": f.Scalar(dtype=np.int32)}
        for name in TEXT_FIELDS:
            feats[name] = f.Text()
        if self.has_images:
            feats["target_image"] = f.Tensor(shape=(), dtype=np.object_)
            if self.num_cond:
                feats["cond_images"] = f.Tensor(shape=(self.num_cond,), dtype=np.object_)
        if self.has_latents:
            dt = np.dtype(self.latent_dtype)
            feats["target_latents"] = f.Tensor(shape=tuple(self.latent_shape), dtype=dt)
            if self.num_cond:
                feats["cond_latents"] = f.Tensor(shape=(self.num_cond, *self.latent_shape), dtype=dt)
        if self.has_teacher:
            feats["teacher_image"] = f.Tensor(shape=(self.teacher_dim,), dtype=np.float16)
            feats["teacher_text"] = f.Tensor(shape=(self.teacher_dim,), dtype=np.float16)
        return f.FeaturesDict(feats)

    # ------------------------------------------------------------------ validation

    def validate(self, rec: Mapping[str, Any]) -> None:
        """Raise RecordError naming the first field of `rec` that does not fit this spec."""
        for name in TEXT_FIELDS:
            if not isinstance(rec.get(name), str):
                raise RecordError(f"{name}: expected text, got {type(rec.get(name)).__name__}")
        if not rec["caption"].strip():
            raise RecordError("caption: empty text")
        if self.num_cond and self.task != "t2i" and not rec["instruction"].strip():
            raise RecordError("instruction: empty text")
        if self.task == "vqa" and not rec["question"].strip():
            raise RecordError("question: empty text")
        if self.has_images:
            _check_image(rec.get("target_image"), "target_image")
            if self.num_cond:
                conds = rec.get("cond_images")
                if not isinstance(conds, (list, tuple)) or len(conds) != self.num_cond:
                    raise RecordError(f"cond_images: expected {self.num_cond} images")
                for i, c in enumerate(conds):
                    _check_image(c, f"cond_images[{i}]")
        if self.has_latents:
            _check_array(rec.get("target_latents"), tuple(self.latent_shape), "target_latents")
            if self.num_cond:
                _check_array(rec.get("cond_latents"), (self.num_cond, *self.latent_shape), "cond_latents")
        if self.has_teacher:
            for name in ("teacher_image", "teacher_text"):
                _check_array(rec.get(name), (self.teacher_dim,), name)


def _check_image(x, name: str) -> None:
    if isinstance(x, (bytes, bytearray)):
        if not x:
            raise RecordError(f"{name}: empty image bytes")
        return
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[-1] == 3:
        return
    raise RecordError(f"{name}: expected encoded image bytes or a uint8 (H, W, 3) array")


def _check_array(x, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(x, np.ndarray) or tuple(x.shape) != shape:
        got = getattr(x, "shape", type(x).__name__)
        raise RecordError(f"{name}: expected an array of shape {shape}, got {got}")
    if not np.all(np.isfinite(x)):
        raise RecordError(f"{name}: non-finite values")


def new_record(task: str, *, key: str, caption: str, instruction: str = "", question: str = "",
               **arrays) -> dict[str, Any]:
    """A record dict with every text field present (the order of TEXT_FIELDS)."""
    check_task(task)
    rec = dict(schema_version=SCHEMA_VERSION, key=key, caption=caption, instruction=instruction,
               question=question)
    rec.update(arrays)
    return rec


def text(x) -> str:
    """A text field as str (TFDS returns bytes)."""
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


# ---------------------------------------------------------------------------- reading


METADATA_KEY = "unialignment_record_spec"


def find_dataset_dir(path: str) -> str:
    """The directory holding dataset_info.json: `path` itself or its one version subdirectory."""
    from etils import epath

    p = epath.Path(path)
    if (p / "dataset_info.json").exists():
        return str(p)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such prepared dataset")
    found = sorted(q.parent for q in _find_named(p, "dataset_info.json", depth=4))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path}: not a complete prepared dataset (no dataset_info.json; an interrupted "
            f"`unialignment prepare` leaves none)" if not found else
            f"{path}: holds {len(found)} datasets; give one of {[str(f) for f in found]}")
    return str(found[0])


def _find_named(root, name: str, depth: int) -> list:
    """Files called `name` in the `depth` directory levels under `root` (listing level by level:
    epath refuses recursive `**` globs on buckets)."""
    found, level = [], [root]
    for _ in range(depth):
        below = []
        for d in level:
            for child in d.iterdir():
                if child.name == name:
                    found.append(child)
                elif child.is_dir():
                    below.append(child)
        level = below
    return found


def open_prepared(path: str):
    """(builder, RecordSpec) of a prepared dataset directory (no builder class needed)."""
    import tensorflow_datasets as tfds

    d = find_dataset_dir(path)
    builder = tfds.builder_from_directory(d)
    meta = builder.info.metadata or {}
    if METADATA_KEY not in meta:
        raise RecordError(f"{d}: not a unialignment prepared dataset (metadata has no {METADATA_KEY})")
    spec_json = meta[METADATA_KEY]
    spec = RecordSpec.from_json(json.loads(spec_json) if isinstance(spec_json, str) else spec_json)
    return builder, spec


__all__ = ["SCHEMA_VERSION", "TASKS", "RecordSpec", "RecordError", "new_record", "text", "open_prepared",
           "find_dataset_dir", "METADATA_KEY"]
