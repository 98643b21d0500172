"""The Shapes world: procedural scenes of coloured shapes whose every answer is known exactly.

The embedded default that the demo trains on (data.<task> = "shapes", no preparation step), and a benchmark with exact
scoring. A scene holds 1-3 shapes; a shape is (kind, colour, size, cell): kind in KINDS, colour in
COLOURS, size in SIZES, cell one of the 9 cells of a 3 x 3 grid (names in POSITIONS). Shapes never
overlap (one per cell) and are drawn with hard edges on a black background, so an image parses back
into its scene exactly (`parse_image`; exact at 24 px and above, the demo uses 32), and so does a
caption (`parse_caption`). `score_scenes` compares a parsed output with the target for an evaluator.

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

Teacher features (intrinsic alignment targets): a fixed random projection (seeded) of the scene's
attribute vector: one slot per (kind, colour, size, cell), colours extended by the two map "colours"
(segmentation, depth). Images and captions use different projections (`ShapesTeacher`); a text that
is not a scene caption (a VQA question and answer) falls back to a bag of its attribute words.
Features are unit vectors, stored in float16 like every teacher's.

`write_official(...)` writes a split as official-format JSONL + PNG files, so the Shapes world
exercises `unialignment prepare` exactly like real data; `ShapesSource` is the in-memory Grain
source that feeds the demo trainer directly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from unialignment_jax.tasks import TASKS, check_task, num_conditions

KINDS = ("circle", "square", "triangle")
COLOURS = {  # object colours (RGB)
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 60, 200),
    "cyan": (40, 200, 210),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUND = (0, 0, 0)
# Perception maps: a segmentation map paints each shape with its kind's colour; a depth map paints
# near (large) shapes light and far (small) shapes dark. In a parsed scene their colour is "seg"/"depth".
SEG_COLOURS = {"circle": (255, 255, 255), "square": (140, 70, 20), "triangle": (20, 110, 110)}
DEPTH_COLOURS = {"large": (170, 170, 170), "small": (85, 85, 85)}
MAP_COLOURS = ("seg", "depth")
ALL_COLOURS = COLOUR_NAMES + MAP_COLOURS
PERCEPTION_INSTRUCTIONS = {
    "seg": "Provide a segmentation map of the shapes.",
    "depth": "Provide a depth map of the scene.",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "validation", "test")
ATTR_DIM = len(KINDS) * len(ALL_COLOURS) * len(SIZES) * len(POSITIONS)  # 432
CENTER = POSITIONS.index("center")
# Every token of every Shapes text (captions, instructions, questions, answers) for the closed-vocabulary
# word tokenizer (data/tokenizers.WordTokenizer, `tokenizer.vocabulary = "shapes"`); the order fixes
# the ids. tests/test_tokenizers.py checks that generated texts of every task encode without unk.
_TEMPLATE_WORDS = ("a", "the", "at", "and", "of", "is", "are", "there", "to", "image", "scene", "shape",
                   "shapes", "colour", "size", "map", "segmentation", "depth", "near", "far", "nothing",
                   "yes", "no", "many", "Make", "Move", "Remove", "Add", "Place", "Provide", "What", "Where",
                   "How", "Is", "top", "bottom", "left", "right", "center")
VOCABULARY = tuple(dict.fromkeys(
    (",", ".", "?") + _TEMPLATE_WORDS + KINDS + COLOUR_NAMES + SIZES + NUMBER_WORDS
    + tuple(str(j) for j in range(1, 10))))
_RADIUS = {"small": 0.24, "large": 0.40}  # shape radius as a fraction of the cell size


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
    cell: int
    kind: str
    colour: str
    size: str

    def phrase(self, colour: bool = True) -> str:
        """'large red circle' (the size word is 'near'/'far' in a depth map)."""
        if self.colour == "depth":
            return f"{'near' if self.size == 'large' else 'far'} {self.kind}"
        if self.colour == "seg" or not colour:
            return f"{self.size} {self.kind}"
        return f"{self.size} {self.colour} {self.kind}"


Scene = tuple  # tuple[Shape, ...], sorted by cell (one shape per cell)


def make_scene(shapes: Iterable[Shape]) -> Scene:
    out = tuple(sorted(shapes))
    cells = [s.cell for s in out]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two shapes in one cell: {out}")
    return out


# ---------------------------------------------------------------------------------- language


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """The exact caption: 'a large red circle at the top left and a small blue square at the center.'"""
    if not scene:
        return "an empty scene."
    body = _join([f"a {s.phrase()} at the {POSITIONS[s.cell]}" for s in scene])
    prefix = {"seg": "a segmentation map of ", "depth": "a depth map of "}.get(scene[0].colour, "")
    return prefix + body + "."


_POS_RE = "|".join(sorted((re.escape(p) for p in POSITIONS), key=len, reverse=True))
_SHAPE_RE = re.compile(
    rf"a (?P<size>small|large|near|far) (?:(?P<colour>{'|'.join(COLOUR_NAMES)}) )?(?P<kind>{'|'.join(KINDS)}) "
    rf"at the (?P<pos>{_POS_RE})")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None if `text` is not an exact Shapes caption."""
    text = text.strip()
    mode = ""
    for m, prefix in (("seg", "a segmentation map of "), ("depth", "a depth map of ")):
        if text.startswith(prefix):
            mode, text = m, text[len(prefix):]
    if text == "an empty scene.":
        return ()
    if not text.endswith("."):
        return None
    parts = re.split(r", | and ", text[:-1])
    shapes = []
    for part in parts:
        m = _SHAPE_RE.fullmatch(part)
        if not m:
            return None
        size = {"near": "large", "far": "small"}.get(m["size"], m["size"])
        if (m["size"] in ("near", "far")) != (mode == "depth") or (m["colour"] is None) != bool(mode):
            return None
        shapes.append(Shape(POSITIONS.index(m["pos"]), m["kind"], m["colour"] or mode, size))
    try:
        return make_scene(shapes)
    except ValueError:
        return None


def refer(scene: Scene, i: int, exclude: Iterable[str] = ()) -> str | None:
    """The shortest unique description of shape i ('circle', 'red circle', 'circle at the top'),
    not using the attributes in `exclude` (colour, size, position); None if there is none."""
    s, exclude = scene[i], set(exclude)
    candidates = [(), ("colour",), ("size",), ("size", "colour"), ("position",), ("colour", "position")]
    for attrs in candidates:
        if exclude & set(attrs):
            continue
        def key(t, attrs=attrs):
            return (t.kind, t.colour if "colour" in attrs else None, t.size if "size" in attrs else None,
                    t.cell if "position" in attrs else None)
        if sum(key(t) == key(s) for t in scene) == 1:
            words = ([s.size] if "size" in attrs else []) + ([s.colour] if "colour" in attrs else []) + [s.kind]
            tail = f" at the {POSITIONS[s.cell]}" if "position" in attrs else ""
            return " ".join(words) + tail
    return None


# ---------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=64)
def _cell_geometry(resolution: int):
    """Per cell: (y slice, x slice, pixel-centre y grid, x grid, centre y, centre x, cell size)."""
    c = resolution / 3.0
    out = []
    for cell in range(9):
        row, col = divmod(cell, 3)
        y0, y1 = int(np.floor(row * c)), int(np.ceil((row + 1) * c))
        x0, x1 = int(np.floor(col * c)), int(np.ceil((col + 1) * c))
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        out.append((slice(y0, y1), slice(x0, x1), ys, xs, (row + 0.5) * c, (col + 0.5) * c, c))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def shape_mask(kind: str, size: str, cell: int, resolution: int) -> np.ndarray:
    """Boolean mask (over the cell's pixel box) of a shape, sampled at pixel centres."""
    _, _, ys, xs, cy, cx, c = _cell_geometry(resolution)[cell]
    r = _RADIUS[size] * c
    dy, dx = ys - cy, xs - cx
    if kind == "circle":
        m = dy * dy + dx * dx <= r * r
    elif kind == "square":
        h = 0.85 * r
        m = (np.abs(dy) <= h) & (np.abs(dx) <= h)
    elif kind == "triangle":  # apex up, base below the centre
        top, base = -r, 0.85 * r
        half = r * (dy - top) / (base - top)
        m = (dy >= top) & (dy <= base) & (np.abs(dx) <= half)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    m = np.ascontiguousarray(m)
    m.setflags(write=False)
    return m


def _paint_colour(s: Shape) -> tuple[int, int, int]:
    if s.colour == "seg":
        return SEG_COLOURS[s.kind]
    if s.colour == "depth":
        return DEPTH_COLOURS[s.size]
    return COLOURS[s.colour]


def render(scene: Scene, resolution: int = 32) -> np.ndarray:
    """uint8 (R, R, 3) image of the scene (map scenes render as their map)."""
    img = np.empty((resolution, resolution, 3), np.uint8)
    img[...] = BACKGROUND
    geo = _cell_geometry(resolution)
    for s in scene:
        ysl, xsl = geo[s.cell][:2]
        img[ysl, xsl][shape_mask(s.kind, s.size, s.cell, resolution)] = _paint_colour(s)
    return img


def as_map(scene: Scene, mode: str) -> Scene:
    """The scene of the perception map ('seg' or 'depth') of `scene`."""
    if mode not in MAP_COLOURS:
        raise ValueError(f"map mode {mode!r}: choose one of {MAP_COLOURS}")
    return tuple(dataclasses.replace(s, colour=mode) for s in scene)


# ---------------------------------------------------------------------------------- parsing


_PALETTE_NAMES = ("background",) + COLOUR_NAMES + tuple(f"seg:{k}" for k in SEG_COLOURS) + tuple(
    f"depth:{k}" for k in DEPTH_COLOURS)
_PALETTE = np.array([BACKGROUND, *COLOURS.values(), *SEG_COLOURS.values(), *DEPTH_COLOURS.values()], np.float32)


def _to_uint8(image) -> np.ndarray:
    x = np.asarray(image)
    if x.dtype != np.uint8:  # float pixels in [-1, 1] (the batch format)
        x = np.clip(np.round((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if x.ndim != 3 or x.shape[-1] != 3 or x.shape[0] != x.shape[1]:
        raise ValueError(f"expected a square (R, R, 3) image, got shape {x.shape}")
    return x


def parse_image(image, min_fill: float = 0.5) -> Scene:
    """The scene in a rendered (or generated) image: uint8 (R, R, 3) or float in [-1, 1].

    Each pixel takes its nearest palette colour; in each cell, the majority non-background colour
    names the shape's colour (or 'seg'/'depth' for map colours), and the (kind, size) template with
    the best IoU against that colour's pixels names its kind and size. A cell whose coloured pixels
    cover less than `min_fill` of the small template is empty. Exact on clean renders."""
    img = _to_uint8(image)
    res = img.shape[0]
    flat = img.reshape(-1, 3).astype(np.float32)
    d = ((flat[:, None, :] - _PALETTE[None]) ** 2).sum(-1)
    labels = d.argmin(-1).reshape(res, res)
    shapes = []
    for cell, (ysl, xsl, *_rest) in enumerate(_cell_geometry(res)):
        lab = labels[ysl, xsl]
        counts = np.bincount(lab.ravel(), minlength=len(_PALETTE_NAMES))
        counts[0] = 0
        best = int(counts.argmax())
        small_area = min(int(shape_mask(k, "small", cell, res).sum()) for k in KINDS)
        if counts[best] < max(1, min_fill * small_area):
            continue
        mask = lab == best
        scores = {}
        for kind in KINDS:
            for size in SIZES:
                t = shape_mask(kind, size, cell, res)
                scores[(kind, size)] = (mask & t).sum() / max(1, (mask | t).sum())
        kind, size = max(scores, key=scores.get)
        name = _PALETTE_NAMES[best]
        colour = name.split(":")[0] if ":" in name else name
        shapes.append(Shape(cell, kind, colour, size))
    return make_scene(shapes)


def score_scenes(pred: Scene | None, target: Scene) -> dict[str, float]:
    """Exact-match scores of a predicted scene against the target (for the evaluator)."""
    pred = pred or ()
    pset, tset = set(pred), set(target)
    inter = len(pset & tset)
    return {
        "exact": float(pset == tset),
        "precision": inter / len(pset) if pset else float(not tset),
        "recall": inter / len(tset) if tset else 1.0,
        "count": float(len(pset) == len(tset)),
    }


# ---------------------------------------------------------------------------------- teacher


def attribute_vector(scene: Scene) -> np.ndarray:
    """float32 (ATTR_DIM,) multi-hot over (kind, colour incl. map colours, size, cell)."""
    v = np.zeros(ATTR_DIM, np.float32)
    for s in scene:
        idx = ((KINDS.index(s.kind) * len(ALL_COLOURS) + ALL_COLOURS.index(s.colour)) * len(SIZES)
               + SIZES.index(s.size)) * len(POSITIONS) + s.cell
        v[idx] = 1.0
    return v


_WORDS = KINDS + COLOUR_NAMES + SIZES + ("near", "far", "segmentation", "depth") + tuple(
    w for p in POSITIONS for w in p.split()) + NUMBER_WORDS + ("yes", "no", "nothing")
_WORDS = tuple(dict.fromkeys(_WORDS))


def word_vector(text: str) -> np.ndarray:
    """Bag of attribute words (the text fallback of ShapesTeacher); never all-zero."""
    v = np.zeros(len(_WORDS) + 1, np.float32)
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in _WORDS:
            v[_WORDS.index(w)] += 1.0
    if not v.any():
        v[-1] = 1.0
    return v


@functools.lru_cache(maxsize=16)
def _projection(rows: int, dim: int, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim)
    p.setflags(write=False)
    return p


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / max(float(np.linalg.norm(x)), 1e-12)).astype(np.float16)


class ShapesTeacher:
    """Exact 'semantic' teacher: features from the symbols, for images and texts (float16 (D,))."""

    IMAGE_SEED, TEXT_SEED, WORD_SEED = 10_001, 10_002, 10_003

    def __init__(self, dim: int, seed: int = 0):
        self.dim = int(dim)
        self.seed = int(seed)

    def scene_image_feature(self, scene: Scene) -> np.ndarray:
        return _unit(attribute_vector(scene) @ _projection(ATTR_DIM, self.dim, self.seed + self.IMAGE_SEED))

    def scene_text_feature(self, scene: Scene) -> np.ndarray:
        return _unit(attribute_vector(scene) @ _projection(ATTR_DIM, self.dim, self.seed + self.TEXT_SEED))

    def text_feature(self, text: str) -> np.ndarray:
        scene = parse_caption(text)
        if scene is not None and scene:
            return self.scene_text_feature(scene)
        return _unit(word_vector(text) @ _projection(len(_WORDS) + 1, self.dim, self.seed + self.WORD_SEED))

    # The teachers.py interface (batched): images uint8 (B, H, W, 3) or float [-1, 1].
    def encode_images(self, images) -> np.ndarray:
        return np.stack([self.scene_image_feature(parse_image(im)) for im in images])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.text_feature(t) for t in texts])


# ---------------------------------------------------------------------------------- examples


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
        text = "Place " + _join([f"image {j + 1} at the {POSITIONS[s.cell]}" for j, s in enumerate(shapes)]) + "."
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


__all__ = ["KINDS", "COLOURS", "SIZES", "POSITIONS", "SPLITS", "Shape", "make_scene", "caption", "parse_caption",
           "refer", "render", "as_map", "parse_image", "score_scenes", "attribute_vector", "ShapesTeacher",
           "ShapesExample", "VOCABULARY", "make_example", "ShapesSource", "write_official", "official_row", "split_of",
           "random_scene", "shape_mask", "PERCEPTION_INSTRUCTIONS"]
