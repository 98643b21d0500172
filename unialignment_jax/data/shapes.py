"""The Shapes world: procedural scenes of coloured shapes whose every answer is known exactly.

The embedded default that the demo trains on (data.<task> = "shapes", no preparation step), and a benchmark with exact
scoring. A scene holds 1-3 shapes; a shape is (kind, colour, size, cell): kind in KINDS, colour in
COLOURS, size in SIZES, cell one of the 9 cells of a 3 x 3 grid (names in POSITIONS). Shapes never
overlap (one per cell) and are drawn with hard edges on a black background, so an image parses back
into its scene exactly (`parse_image`; exact at 24 px and above, the demo uses 32), and so does a
caption (`parse_caption`). `score_scenes` compares a parsed output with the target for an evaluator.
The tasks drawn from it (examples, splits, the Grain source, official-format files) are in
data/shapes_tasks.py.

Teacher features (intrinsic alignment targets): a fixed random projection (seeded) of the scene's
attribute vector: one slot per (kind, colour, size, cell), colours extended by the two map "colours"
(segmentation, depth). Images and captions use different projections (`ShapesTeacher`); a text that
is not a scene caption (a VQA question and answer) falls back to a bag of its attribute words.
Features are unit vectors, stored in float16 like every teacher's.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Sequence

import numpy as np

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


def join_phrases(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """The exact caption: 'a large red circle at the top left and a small blue square at the center.'"""
    if not scene:
        return "an empty scene."
    body = join_phrases([f"a {s.phrase()} at the {POSITIONS[s.cell]}" for s in scene])
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
