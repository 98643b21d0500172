"""The Shapes world's tasks (data/shapes.py holds the world: scenes, captions, rendering, parsing,
teacher features): examples drawn per task and split, the in-memory Grain source, and
official-format files.

Tasks (the batch format of tasks.py; `make_example(task, split, index)` gives the symbols,
`ShapesExample.record(resolution)` the record of data/records.py):
  t2i         scene -> image; prompt = caption ("a large red circle at the top left and ...")
  edit        source scene + instruction -> target scene; ops: recolour, move, remove, add
  perception  scene image + instruction -> a segmentation map (colour per kind) or a depth map
              (near = large, far = small) of the same scene, rendered as RGB
  compose     K reference images, each one shape alone at the centre, + "Place image 1 at the top left,
              image 2 at the center and image 3 at the right." -> the scene assembled from them
  caption     image -> caption
  vqa         image + question ("What colour is the square?") -> short answer ("red")

Splits: every example is keyed by its symbols (`ShapesExample.split_key`); a stable hash of the key
puts it in train (80%), validation (10%) or test (10%), and `make_example(task, split, i)` draws
(deterministically from (seed, task, split, i)) until the key falls in `split`. Held-out scenes are
therefore never trained on, by construction.

`write_official(...)` writes a split as official-format JSONL + PNG files, so the Shapes world
exercises `unialignment prepare` exactly like real data; `ShapesSource` is the in-memory Grain
source that feeds the demo trainer directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from unialignment_jax.data.shapes import (CENTER, COLOUR_NAMES, KINDS, MAP_COLOURS, NUMBER_WORDS,
                                          PERCEPTION_INSTRUCTIONS, POSITIONS, SIZES, Scene, Shape, ShapesTeacher,
                                          as_map, caption, join_phrases, make_scene, refer, render)
from unialignment_jax.tasks import TASKS, check_task, num_conditions

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class ShapesExample:
    """The symbols of one example; `record(resolution)` renders it."""

    task: str
    target: Scene  # scene of the target image (a map scene for perception)
    conds: tuple = ()  # scenes of the condition images
    caption: str = ""  # text-pass target (the answer for vqa)
    instruction: str = ""
    question: str = ""
    op: str = ""  # edit op (recolour/move/remove/add) or perception map (seg/depth) or vqa kind

    @property
    def split_key(self) -> str:
        return "|".join([self.task, repr(self.target), repr(self.conds), self.instruction, self.question])

    def images(self, resolution: int) -> tuple[np.ndarray, list[np.ndarray]]:
        return render(self.target, resolution), [render(c, resolution) for c in self.conds]

    def record(self, resolution: int, teacher: ShapesTeacher | None = None, key: str = "") -> dict:
        from unialignment_jax.data.records import new_record

        target, conds = self.images(resolution)
        rec = new_record(self.task, key=key, caption=self.caption, instruction=self.instruction,
                         question=self.question, target_image=target)
        if conds:
            rec["cond_images"] = conds
        if teacher is not None:
            rec["teacher_image"] = teacher.scene_image_feature(self.target)
            text = self.caption if self.task != "vqa" else f"{self.question} {self.caption}"
            rec["teacher_text"] = teacher.text_feature(text)
        return rec


def split_of(key: str) -> str:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "little") % 10
    return "train" if h < 8 else ("validation" if h == 8 else "test")


def _random_shape(rng, cell: int) -> Shape:
    return Shape(int(cell), KINDS[rng.integers(len(KINDS))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                 SIZES[rng.integers(len(SIZES))])


def random_scene(rng, n: int | None = None, min_shapes: int = 1, max_shapes: int = 3) -> Scene:
    n = int(rng.integers(min_shapes, max_shapes + 1)) if n is None else n
    cells = rng.choice(9, size=n, replace=False)
    return make_scene(_random_shape(rng, c) for c in cells)


def _draw_edit(rng) -> ShapesExample:
    op = ("recolour", "move", "remove", "add")[rng.integers(4)]
    if op == "remove":
        src = random_scene(rng, min_shapes=2, max_shapes=3)
    elif op == "add":
        src = random_scene(rng, min_shapes=1, max_shapes=2)
    else:
        src = random_scene(rng)
    i = int(rng.integers(len(src)))
    s = src[i]
    empty = [c for c in range(9) if c not in {t.cell for t in src}]
    ref = refer(src, i)
    if op == "recolour":
        new = COLOUR_NAMES[rng.choice([k for k, c in enumerate(COLOUR_NAMES) if c != s.colour])]
        tgt = make_scene([*src[:i], dataclasses.replace(s, colour=new), *src[i + 1:]])
        text = f"Make the {ref} {new}."
    elif op == "move":
        cell = int(rng.choice(empty))
        tgt = make_scene([*src[:i], dataclasses.replace(s, cell=cell), *src[i + 1:]])
        text = f"Move the {ref} to the {POSITIONS[cell]}."
    elif op == "remove":
        tgt = make_scene([*src[:i], *src[i + 1:]])
        text = f"Remove the {ref}."
    else:
        new = _random_shape(rng, int(rng.choice(empty)))
        tgt = make_scene([*src, new])
        text = f"Add a {new.phrase()} at the {POSITIONS[new.cell]}."
    return ShapesExample("edit", tgt, (src,), caption(tgt), text, op=op)


def _draw_vqa(rng) -> ShapesExample:
    scene = random_scene(rng)
    kinds = ["count", "colour", "shape", "where", "size", "exists"]
    for _ in range(20):
        q = kinds[rng.integers(len(kinds))]
        i = int(rng.integers(len(scene)))
        s = scene[i]
        if q == "count":
            question, answer = "How many shapes are there?", NUMBER_WORDS[len(scene)]
        elif q == "colour":
            question, answer = f"What colour is the {refer(scene, i, ['colour'])}?", s.colour
        elif q == "size":
            question, answer = f"What size is the {refer(scene, i, ['size'])}?", s.size
        elif q == "shape":
            cell = int(rng.integers(9))
            here = [t for t in scene if t.cell == cell]
            question = f"What shape is at the {POSITIONS[cell]}?"
            answer = here[0].kind if here else "nothing"
        elif q == "where":
            ref = refer(scene, i, ["position"])
            if ref is None:
                continue
            question, answer = f"Where is the {ref}?", POSITIONS[s.cell]
        else:
            probe = _random_shape(rng, 0) if rng.integers(2) else s
            found = any(t.kind == probe.kind and t.colour == probe.colour for t in scene)
            question, answer = f"Is there a {probe.colour} {probe.kind}?", "yes" if found else "no"
        return ShapesExample("vqa", scene, (), answer, question=question, op=q)
    raise AssertionError("unreachable: 'count' always applies")


def _draw(task: str, rng, num_compose_refs: int) -> ShapesExample:
    if task in ("t2i", "caption"):
        scene = random_scene(rng)
        return ShapesExample(task, scene, (), caption(scene))
    if task == "edit":
        return _draw_edit(rng)
    if task == "perception":
        scene = random_scene(rng)
        mode = MAP_COLOURS[rng.integers(2)]
        m = as_map(scene, mode)
        return ShapesExample(task, m, (scene,), caption(m), PERCEPTION_INSTRUCTIONS[mode], op=mode)
    if task == "compose":
        k = num_compose_refs
        if not 1 <= k <= 9:
            raise ValueError(f"num_compose_refs = {k}: the Shapes world composes 1 to 9 references")
        cells = [int(c) for c in rng.choice(9, size=k, replace=False)]
        shapes = [_random_shape(rng, c) for c in cells]
        refs = tuple((dataclasses.replace(s, cell=CENTER),) for s in shapes)
        target = make_scene(shapes)
        text = "Place " + join_phrases([f"image {j + 1} at the {POSITIONS[s.cell]}" for j, s in enumerate(shapes)]) + "."
        return ShapesExample(task, target, refs, caption(target), text)
    if task == "vqa":
        return _draw_vqa(rng)
    raise ValueError(task)


def make_example(task: str, split: str, index: int, seed: int = 0, num_compose_refs: int = 3) -> ShapesExample:
    """Example `index` of (task, split): deterministic in (seed, task, split, index)."""
    check_task(task)
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    rng = np.random.default_rng([int(seed), TASKS.index(task), SPLITS.index(split), int(index)])
    for _ in range(1000):
        ex = _draw(task, rng, num_compose_refs)
        if split_of(ex.split_key) == split:
            return ex
    raise RuntimeError(f"no {split} example found for {task} #{index} (seed {seed})")


class ShapesSource:
    """In-memory Grain data source (`__len__`, `__getitem__`) of Shapes records; picklable.

    Records follow data/records.py with images as uint8 arrays; with `teacher_dim` > 0 they carry
    ShapesTeacher features."""

    def __init__(self, task: str, split: str = "train", size: int = 100_000, resolution: int = 32,
                 num_compose_refs: int = 3, teacher_dim: int = 0, seed: int = 0):
        self.task, self.split, self.size = check_task(task), split, int(size)
        self.resolution, self.num_compose_refs, self.seed = int(resolution), int(num_compose_refs), int(seed)
        self.teacher_dim = int(teacher_dim)
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: choose one of {SPLITS}")
        self.num_cond = num_conditions(task, num_compose_refs)

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> ShapesExample:
        return make_example(self.task, self.split, index, self.seed, self.num_compose_refs)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(index)
        teacher = ShapesTeacher(self.teacher_dim, self.seed) if self.teacher_dim else None
        return self.example(index).record(self.resolution, teacher, key=f"shapes/{self.task}/{self.split}:{index}")

    def __repr__(self) -> str:
        return (f"ShapesSource(task={self.task!r}, split={self.split!r}, size={self.size}, "
                f"resolution={self.resolution}, seed={self.seed})")


# ---------------------------------------------------------------------------------- official files


def official_row(ex: ShapesExample, paths: Sequence[str]) -> dict:
    """The official JSONL row of an example; `paths` = [cond paths..., target path]."""
    *cond_paths, target = paths
    if ex.task == "t2i":
        return {"image": [target], "conversations": [{"from": "human", "value": ex.caption},
                                                     {"from": "gpt", "value": "<image>"}]}
    if ex.task in ("edit", "perception"):
        return {"image": [cond_paths[0], target], "conversations": [{"from": "human", "value": ex.caption},
                                                                    {"from": "gpt", "value": "<image>"}],
                "instruction": ex.instruction}
    if ex.task == "compose":
        return {"original_images": list(cond_paths), "generated_images": [target], "edit_prompt": ex.instruction,
                "caption": ex.caption}
    if ex.task == "caption":
        return {"image": [target], "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                     {"from": "gpt", "value": ex.caption}]}
    return {"image": [target], "conversations": [{"from": "human", "value": "<image>\n" + ex.question},
                                                 {"from": "gpt", "value": ex.caption}]}


def write_official(task: str, split: str, num_examples: int, out_dir: str, resolution: int = 32,
                   seed: int = 0, num_compose_refs: int = 3, start: int = 0) -> str:
    """Write examples [start, start + n) of (task, split) as PNG files and an official-format JSONL
    manifest (image paths relative to `out_dir`, the `--images-root`). Returns the manifest path."""
    from PIL import Image

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    manifest = os.path.join(out_dir, f"shapes_{task}_{split}.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        for i in range(start, start + num_examples):
            ex = make_example(task, split, i, seed, num_compose_refs)
            target, conds = ex.images(resolution)
            paths = []
            for j, img in enumerate([*conds, target]):
                tag = "target" if j == len(conds) else f"cond{j}"
                rel = f"images/{task}_{split}_{i:07d}_{tag}.png"
                Image.fromarray(img).save(os.path.join(out_dir, rel))
                paths.append(rel)
            f.write(json.dumps(official_row(ex, paths)) + "\n")
    return manifest
