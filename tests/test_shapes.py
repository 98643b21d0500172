"""The Shapes world: exact rendering/parsing, exact language, deterministic held-out splits, the
edit semantics, the symbolic teacher, and the official-format export."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from unialignment_jax.data import shapes as S
from unialignment_jax.data import shapes_tasks
from unialignment_jax.tasks import TASKS


@pytest.mark.parametrize("res", [24, 32, 64])
def test_every_single_shape_parses_back_exactly(res):
    for cell in range(9):
        for kind in S.KINDS:
            for size in S.SIZES:
                for colour in S.ALL_COLOURS:
                    scene = S.make_scene([S.Shape(cell, kind, colour, size)])
                    assert S.parse_image(S.render(scene, res)) == scene


def test_render_is_plain_background_with_palette_colours():
    scene = S.make_scene([S.Shape(0, "circle", "red", "large"), S.Shape(4, "square", "blue", "small")])
    img = S.render(scene, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert colours == {S.BACKGROUND, S.COLOURS["red"], S.COLOURS["blue"]}
    # the square's centre pixel (cell 4 is the middle of the image) has the square's colour
    assert tuple(img[16, 16]) == S.COLOURS["blue"]
    # parsing works on the batch format too (float pixels in [-1, 1])
    assert S.parse_image(img.astype(np.float32) / 127.5 - 1.0) == scene


def test_examples_are_deterministic_and_splits_are_disjoint():
    for task in TASKS:
        seen = {}
        for split in shapes_tasks.SPLITS:
            keys = set()
            for i in range(40):
                a, b = shapes_tasks.make_example(task, split, i), shapes_tasks.make_example(task, split, i)
                assert a == b
                assert shapes_tasks.split_of(a.split_key) == split
                keys.add(a.split_key)
            seen[split] = keys
        assert not seen["train"] & seen["validation"] and not seen["train"] & seen["test"]
        assert not seen["validation"] & seen["test"]
    # another seed gives other examples
    assert shapes_tasks.make_example("t2i", "train", 0, seed=1) != shapes_tasks.make_example("t2i", "train", 0, seed=0)


def test_captions_are_exact_and_parse_back():
    for i in range(60):
        for task in ("t2i", "caption", "edit", "compose", "perception"):
            ex = shapes_tasks.make_example(task, "train", i)
            assert S.parse_caption(ex.caption) == ex.target
            assert S.parse_image(S.render(ex.target, 32)) == ex.target
    assert S.parse_caption("a large red circle at the top left and a small blue square at the center.") == (
        S.Shape(0, "circle", "red", "large"), S.Shape(4, "square", "blue", "small"))
    assert S.parse_caption("a purple circle somewhere.") is None
    # exact scores for an evaluator
    target = shapes_tasks.make_example("t2i", "test", 0).target
    assert S.score_scenes(S.parse_image(S.render(target, 32)), target)["exact"] == 1.0
    wrong = S.make_scene([S.Shape((target[0].cell + 1) % 9, "circle", "red", "small")])
    assert S.score_scenes(wrong, target)["exact"] == 0.0 and S.score_scenes(None, target)["recall"] == 0.0


def _apply(op, instruction, src):
    """Interpret an edit instruction on the source scene (an independent reading of the text)."""
    def find(ref):
        words = ref.split(" at the ")
        pos = S.POSITIONS.index(words[1]) if len(words) > 1 else None
        attrs = words[0].split()
        hits = [s for s in src if s.kind == attrs[-1] and all(
            a in (s.colour, s.size) for a in attrs[:-1]) and (pos is None or s.cell == pos)]
        assert len(hits) == 1, (ref, src)
        return hits[0]
    rest = [s for s in src]
    if op == "remove":
        t = find(instruction[len("Remove the "):-1])
        return S.make_scene(s for s in rest if s != t)
    if op == "add":
        words = instruction[len("Add a "):-1].split(" at the ")
        size, colour, kind = words[0].split()
        return S.make_scene([*rest, S.Shape(S.POSITIONS.index(words[1]), kind, colour, size)])
    if op == "move":
        ref, pos = instruction[len("Move the "):-1].split(" to the ")
        t = find(ref)
        return S.make_scene([s for s in rest if s != t] + [S.Shape(S.POSITIONS.index(pos), t.kind, t.colour, t.size)])
    body = instruction[len("Make the "):-1]
    ref, colour = body.rsplit(" ", 1)
    t = find(ref)
    return S.make_scene([s for s in rest if s != t] + [S.Shape(t.cell, t.kind, colour, t.size)])


def test_edits_do_what_the_instruction_says():
    ops = set()
    for i in range(200):
        ex = shapes_tasks.make_example("edit", "train", i)
        ops.add(ex.op)
        (src,) = ex.conds
        assert _apply(ex.op, ex.instruction, src) == ex.target, ex
        assert ex.caption == S.caption(ex.target)
    assert ops == {"recolour", "move", "remove", "add"}


def test_perception_compose_and_vqa_semantics():
    ex = shapes_tasks.make_example("perception", "train", 3)
    (scene,) = ex.conds
    assert ex.target == S.as_map(scene, ex.op) and ex.instruction == S.PERCEPTION_INSTRUCTIONS[ex.op]
    img = S.render(ex.target, 32)
    assert S.parse_image(img) == ex.target  # maps parse too (colour 'seg' / 'depth')
    ex = shapes_tasks.make_example("compose", "train", 5, num_compose_refs=3)
    assert len(ex.conds) == 3 and len(ex.target) == 3
    for j, ref in enumerate(ex.conds):  # each reference is one shape alone at the centre
        (r,) = ref
        assert r.cell == S.CENTER
        placed = [s for s in ex.target if (s.kind, s.colour, s.size) == (r.kind, r.colour, r.size)]
        assert placed and f"image {j + 1} at the {S.POSITIONS[placed[0].cell]}" in ex.instruction
    for i in range(100):
        ex = shapes_tasks.make_example("vqa", "train", i)
        scene, q, a = ex.target, ex.question, ex.caption
        if ex.op == "count":
            assert a == S.NUMBER_WORDS[len(scene)]
        elif ex.op == "colour":
            assert a in S.COLOURS and any(s.colour == a for s in scene)
        elif ex.op == "shape":
            pos = q[len("What shape is at the "):-1]
            here = [s.kind for s in scene if S.POSITIONS[s.cell] == pos]
            assert a == (here[0] if here else "nothing")
        elif ex.op == "exists":
            colour, kind = q[len("Is there a "):-1].split()
            assert a == ("yes" if any(s.colour == colour and s.kind == kind for s in scene) else "no")


def test_teacher_features_are_exact_and_meaningful():
    t = S.ShapesTeacher(64)
    a, b = shapes_tasks.make_example("t2i", "train", 0), shapes_tasks.make_example("t2i", "train", 1)
    fa = t.scene_image_feature(a.target)
    assert fa.dtype == np.float16 and fa.shape == (64,)
    assert abs(np.linalg.norm(fa.astype(np.float32)) - 1) < 1e-2
    # from pixels / caption text: the same as from the symbols
    np.testing.assert_array_equal(t.encode_images([S.render(a.target, 32)])[0], fa)
    np.testing.assert_array_equal(t.encode_texts([a.caption])[0], t.scene_text_feature(a.target))
    # similar scenes are closer than unrelated ones
    s0 = S.make_scene([S.Shape(0, "circle", "red", "large"), S.Shape(4, "square", "blue", "small")])
    s1 = S.make_scene([S.Shape(0, "circle", "red", "large"), S.Shape(8, "triangle", "green", "small")])
    s2 = S.make_scene([S.Shape(2, "triangle", "cyan", "small")])
    f = [t.scene_image_feature(s).astype(np.float32) for s in (s0, s1, s2)]
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2
    rec = shapes_tasks.ShapesSource("vqa", teacher_dim=32)[0]
    assert rec["teacher_text"].shape == (32,) and np.isfinite(rec["teacher_text"].astype(np.float32)).all()


def test_source_records_and_official_export(tmp_path):
    src = shapes_tasks.ShapesSource("compose", "validation", size=10, resolution=32, teacher_dim=16)
    assert len(src) == 10
    rec = src[3]
    assert rec["target_image"].shape == (32, 32, 3) and len(rec["cond_images"]) == 3
    with pytest.raises(IndexError):
        src[10]
    import pickle

    assert pickle.loads(pickle.dumps(src))[3]["caption"] == rec["caption"]
    for task in TASKS:
        manifest = shapes_tasks.write_official(task, "test", 3, str(tmp_path / task), resolution=32)
        rows = [json.loads(line) for line in open(manifest)]
        assert len(rows) == 3
        ex = shapes_tasks.make_example(task, "test", 0)
        row = rows[0]
        if task == "compose":
            paths = row["original_images"] + row["generated_images"]
            assert row["edit_prompt"] == ex.instruction and row["caption"] == ex.caption
        else:
            paths = row["image"]
            assert "conversations" in row
        target = np.asarray(Image.open(os.path.join(tmp_path / task, paths[-1])))
        np.testing.assert_array_equal(target, S.render(ex.target, 32))
