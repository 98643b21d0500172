"""Exact scorers of the Shapes benchmark: generated pixels and tokens against known answers.

No model, no jax: each scorer takes what a sampler produced (uint8 images or decoded texts) and the
example's symbols (data/shapes.py) and returns a dict of per-example scores in [0, 1]; `aggregate`
averages them. Every scorer gives 1.0 on the ground-truth output (the rendered target, the exact
caption, the exact answer).

  t2i, compose   the image is parsed into a scene (`shapes.parse_image`). For each named shape, at
                 its named position: is a shape there (`position`), and does it have the named
                 kind, colour and size (`kind`, `colour`, `size`; a missing shape scores 0 on all).
                 `attr_acc` = mean of kind / colour / size over the named shapes (the headline,
                 GenEval-like attribute binding); `object_acc` = named shapes exactly right;
                 `relation` = pairs of named shapes whose generated counterparts (found by kind and
                 colour) keep their relative placement (left/right, above/below); `count`; `exact`
                 (the scene, no more, no less).
  edit           against the source scene S and target scene T: `edit_success` (the named change
                 happened: every shape of T not in S is there, no shape of S not in T is left),
                 `preserved` (nothing else changed: every unchanged shape is still there and nothing
                 was added), `exact`, and `attr_acc` against T.
  perception     `map_mae` (mean absolute pixel error against the exact map, in [0, 1]; lower is
                 better), `label_acc` (pixels whose nearest palette colour matches the exact map's),
                 `attr_acc` / `exact` of the parsed map scene.
  caption        the text is parsed leniently (every "a <size> [<colour>] <kind> at the <position>"
                 phrase; the first per position) into a scene, then scored like t2i; `exact` = the
                 text is the exact caption.
  vqa            `accuracy` = the answer equals the reference (case and a final period ignored);
                 also reported per question kind (`acc/colour`, `acc/count`, ...).

`chance` scores the ground truth of another example (right form, wrong scene): the level a model
that ignores its prompt, image or question reaches.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from unialignment_jax.data import shapes
from unialignment_jax.data import shapes_tasks

PRIMARY = {"t2i": "attr_acc", "compose": "attr_acc", "edit": "exact", "perception": "map_mae",
           "caption": "attr_acc", "vqa": "accuracy"}


def _by_cell(scene) -> dict:
    return {s.cell: s for s in (scene or ())}


def _relation(a, b) -> tuple[int, int]:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    return int(np.sign(ra - rb)), int(np.sign(ca - cb))


def scene_scores(pred, target) -> dict[str, float]:
    """Attribute-level scores of a predicted scene (or None: unparseable) against the target scene."""
    pred = tuple(pred or ())
    cells = _by_cell(pred)
    n = max(len(target), 1)
    at = [cells.get(t.cell) for t in target]
    scores = {
        "position": sum(p is not None for p in at) / n,
        "kind": sum(p is not None and p.kind == t.kind for p, t in zip(at, target)) / n,
        "colour": sum(p is not None and p.colour == t.colour for p, t in zip(at, target)) / n,
        "size": sum(p is not None and p.size == t.size for p, t in zip(at, target)) / n,
        "object_acc": sum(p == t for p, t in zip(at, target)) / n,
    }
    if not target:  # an empty target: right only when nothing was generated
        scores = {k: float(not pred) for k in scores}
    scores["attr_acc"] = (scores["kind"] + scores["colour"] + scores["size"]) / 3.0
    scores["count"] = float(len(pred) == len(target))
    scores["exact"] = float(set(pred) == set(target))
    pairs = [(a, b) for i, a in enumerate(target) for b in target[i + 1:]]
    if pairs:
        def find(t):
            same = [p for p in pred if p.kind == t.kind and p.colour == t.colour]
            return same[0] if len(same) == 1 else (cells.get(t.cell) if cells.get(t.cell) in same else None)
        ok = 0
        for a, b in pairs:
            pa, pb = find(a), find(b)
            ok += pa is not None and pb is not None and pa != pb and _relation(pa, pb) == _relation(a, b)
        scores["relation"] = ok / len(pairs)
    return scores


def score_image(image: np.ndarray, target) -> dict[str, float]:
    """t2i / compose: a generated uint8 image against the target scene."""
    return scene_scores(shapes.parse_image(image), target)


def score_edit(image: np.ndarray, source, target) -> dict[str, float]:
    pred = set(shapes.parse_image(image))
    s, t = set(source), set(target)
    out = scene_scores(tuple(sorted(pred)), target)
    out["edit_success"] = float((t - s) <= pred and not (s - t) & pred)
    out["preserved"] = float((s & t) <= pred and pred <= t)
    return out


def _labels(image: np.ndarray) -> np.ndarray:
    flat = image.reshape(-1, 3).astype(np.float32)
    palette = shapes._PALETTE  # background, object colours, segmentation and depth colours
    return ((flat[:, None, :] - palette[None]) ** 2).sum(-1).argmin(-1)


def score_perception(image: np.ndarray, target) -> dict[str, float]:
    """A generated map against the exact map of the target (map) scene."""
    image = np.asarray(image)
    truth = shapes.render(target, image.shape[0])
    out = scene_scores(shapes.parse_image(image), target)
    out["map_mae"] = float(np.abs(image.astype(np.float32) - truth.astype(np.float32)).mean() / 255.0)
    out["label_acc"] = float((_labels(image) == _labels(truth)).mean())
    return out


def parse_caption_lenient(text: str):
    """Every shape phrase in `text` (first per position wins); () when there is none."""
    found = {}
    for m in shapes._SHAPE_RE.finditer(text.lower()):
        size = {"near": "large", "far": "small"}.get(m["size"], m["size"])
        cell = shapes.POSITIONS.index(m["pos"])
        if cell not in found and m["colour"]:
            found[cell] = shapes.Shape(cell, m["kind"], m["colour"], size)
    return shapes.make_scene(found.values())


def score_caption(text: str, target) -> dict[str, float]:
    exact = shapes.parse_caption(text)
    out = scene_scores(exact if exact is not None else parse_caption_lenient(text), target)
    out["exact"] = float(text.strip() == shapes.caption(target))
    return out


def _norm(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.strip().lower()).rstrip(".").strip()


def score_vqa(answer: str, reference: str, kind: str = "") -> dict[str, float]:
    ok = float(_norm(answer) == _norm(reference))
    out = {"accuracy": ok}
    if kind:
        out[f"acc/{kind}"] = ok
    return out


def score_example(example: shapes_tasks.ShapesExample, output) -> dict[str, float]:
    """Score a sampler's output (uint8 image or text) for one Shapes example of any task."""
    task = example.task
    if task in ("t2i", "compose"):
        return score_image(output, example.target)
    if task == "edit":
        return score_edit(output, example.conds[0], example.target)
    if task == "perception":
        return score_perception(output, example.target)
    if task == "caption":
        return score_caption(output, example.target)
    if task == "vqa":
        return score_vqa(output, example.caption, example.op)
    raise ValueError(f"unknown task {task!r}")


def ground_truth(example: shapes_tasks.ShapesExample, resolution: int):
    """The output a perfect model produces (for the scorers' self-test)."""
    if example.task in ("caption", "vqa"):
        return example.caption
    return shapes.render(example.target, resolution)


def chance(examples: Sequence[shapes_tasks.ShapesExample], resolution: int) -> dict[str, float]:
    """The scores of a model that ignores its input: each example gets the ground-truth output of the
    next one (a perfect image or text, of the wrong scene). The level "above chance" is measured
    against. With fewer than two examples, that example's own output: there is nothing to swap."""
    n = len(examples)
    return aggregate(score_example(e, ground_truth(examples[(i + 1) % n], resolution)) for i, e in enumerate(examples))


def aggregate(scores: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Means of every key over the examples that report it, and `n` (the number of examples)."""
    scores = list(scores)
    keys = sorted({k for s in scores for k in s})
    out = {k: float(np.mean([s[k] for s in scores if k in s])) for k in keys}
    out["n"] = len(scores)
    return out


def primary(task: str) -> str:
    return PRIMARY[task]


__all__ = ["scene_scores", "score_image", "score_edit", "score_perception", "score_caption", "score_vqa",
           "score_example", "ground_truth", "chance", "aggregate", "parse_caption_lenient", "primary", "PRIMARY"]

