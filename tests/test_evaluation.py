"""Evaluation (evaluation/): the exact Shapes scorers (perfect on ground truth, chance-level or worse
on noise, partial credit per attribute), the fixed-level validation loss (deterministic), and
`unialignment evaluate` for the three suites on a tiny random run on 8 simulated devices (the
SemGen-Bench tree for a subset, the Shapes suite's JSON) and its exit code 2 on bad input."""

import json
import os

import numpy as np
import pytest

from unialignment_jax import cli
from unialignment_jax import config as config_lib
from unialignment_jax.data import shapes
from unialignment_jax.data import shapes_tasks
from unialignment_jax.evaluation import shapes_scores as S
from unialignment_jax.tasks import TASKS

from test_sampling import perturbed_params, write_run  # noqa: E402  (tests/ is on sys.path)

# ---------------------------------------------------------------------------------- the scorers


def _examples(task, n=40):
    return [shapes_tasks.make_example(task, "test", i) for i in range(n)]


@pytest.mark.parametrize("task", TASKS)
def test_scorer_is_perfect_on_ground_truth(task):
    scores = S.aggregate(S.score_example(e, S.ground_truth(e, 32)) for e in _examples(task))
    for key, value in scores.items():
        if key == "n":
            continue
        assert value == (0.0 if key == "map_mae" else 1.0), (task, key, value)


@pytest.mark.parametrize("task", TASKS)
def test_scorer_is_low_on_noise(task):
    rng = np.random.default_rng(0)
    out = []
    for e in _examples(task):
        if task in ("caption", "vqa"):
            noise = "".join(chr(c) for c in rng.integers(32, 127, size=int(rng.integers(3, 60))))
        else:
            noise = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        out.append(S.score_example(e, noise))
    scores = S.aggregate(out)
    if task == "perception":
        assert scores["map_mae"] > 0.3 and scores["label_acc"] < 0.2
    else:
        assert scores[S.PRIMARY[task]] < 0.45  # t2i/compose/caption: chance (about 1/3) or less
    assert scores.get("exact", 0.0) == 0.0 and scores.get("accuracy", 0.0) == 0.0
    # An empty (black) image or an empty text scores nothing either.
    blank = "" if task in ("caption", "vqa") else np.zeros((32, 32, 3), np.uint8)
    blank_scores = S.aggregate(S.score_example(e, blank) for e in _examples(task, 10))
    assert blank_scores.get("attr_acc", 0.0) == 0.0 and blank_scores.get("accuracy", 0.0) == 0.0


def test_chance_is_another_scenes_ground_truth():
    """The chance baseline: low (a right-form output of the wrong scene), not zero, and measured on
    the same examples; one example has nothing to swap with and scores as its own ground truth."""
    for task in ("t2i", "caption", "vqa"):
        exs = _examples(task, 200)
        level = S.chance(exs, 32)[S.PRIMARY[task]]
        assert 0.02 < level < 0.2, (task, level)
        assert S.chance(exs[:1], 32)[S.PRIMARY[task]] == 1.0
    assert 0.05 < S.chance(_examples("perception", 50), 32)["map_mae"] < 0.3


def test_scores_give_partial_credit_per_attribute():
    target = shapes.make_scene([shapes.Shape(0, "circle", "red", "large"), shapes.Shape(8, "square", "blue", "small")])
    wrong_colour = shapes.make_scene([shapes.Shape(0, "circle", "green", "large"), target[1]])
    s = S.scene_scores(wrong_colour, target)
    assert s["colour"] == 0.5 and s["kind"] == s["size"] == s["position"] == 1.0
    assert s["attr_acc"] == pytest.approx(5 / 6) and s["exact"] == 0.0 and s["object_acc"] == 0.5
    swapped = shapes.make_scene([shapes.Shape(8, "circle", "red", "large"), shapes.Shape(0, "square", "blue", "small")])
    assert S.scene_scores(swapped, target)["relation"] == 0.0
    # Captions: lenient parsing credits the phrases it finds; a truncated caption loses the rest.
    caption = shapes.caption(target)
    assert S.score_caption(caption, target)["exact"] == 1.0
    half = S.score_caption(caption.split(" and ")[0] + ", blah", target)
    assert half["attr_acc"] == 0.5 and half["exact"] == 0.0
    # Edits: the named change, and nothing else.
    ex = next(e for e in _examples("edit", 200) if e.op == "recolour" and len(e.target) > 1)
    src, tgt = ex.conds[0], ex.target
    unchanged = S.score_edit(shapes.render(src, 32), src, tgt)
    assert unchanged["edit_success"] == 0.0 and unchanged["preserved"] == 0.0
    only_change = S.score_edit(shapes.render(tuple(sorted(set(tgt) - set(src))), 32), src, tgt)
    assert only_change["edit_success"] == 1.0 and only_change["preserved"] == 0.0
    assert S.score_edit(shapes.render(tgt, 32), src, tgt)["preserved"] == 1.0
    assert S.score_vqa("Red.", "red", "colour") == {"accuracy": 1.0, "acc/colour": 1.0}


# --------------------------------------------------------------------- a tiny run, the command


@pytest.fixture(scope="module")
def run_dir(repo_root, tmp_path_factory):
    from unialignment_jax.parallel import mesh as mesh_lib
    from unialignment_jax.parallel import rules as rules_lib

    config = config_lib.load(f"{repo_root}/experiments/demo.py:tiny")
    mesh = mesh_lib.make_mesh(config.mesh)
    _, params = perturbed_params(config, mesh, rules_lib.get_rules(config.sharding.rules))
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    write_run(workdir, config, params)
    return workdir


def test_val_loss_is_deterministic(run_dir):
    from unialignment_jax.evaluation import val_loss
    from unialignment_jax.sampling.restore import open_run

    run = open_run(run_dir)
    a = val_loss.evaluate(run, run.params, ["t2i", "vqa"], limit=8, batch_size=8)
    b = val_loss.evaluate(run, run.params, ["t2i", "vqa"], limit=8, batch_size=8)
    assert a == b
    assert a["t2i"]["n"] == 8 and len(a["t2i"]["image_levels"]) == val_loss.NUM_LEVELS
    assert np.isfinite(a["t2i"]["image"]) and np.isfinite(a["vqa"]["text"]) and "image" not in a["vqa"]
    # The official x0-loss is sigma^2 |v - (noise - x0)|^2: it grows with sigma for a random model.
    assert np.all(np.diff(a["t2i"]["image_levels"]) > 0)
    # Captions paired with another example's image: a different (finite) text loss, per level.
    for task in ("t2i", "vqa"):
        assert len(a[task]["text_shuffled_levels"]) == val_loss.NUM_LEVELS
        assert np.isfinite(a[task]["text_shuffled"]) and a[task]["text_shuffled"] != a[task]["text"]


def test_evaluate_shapes_suite_json(run_dir, tmp_path, capsys):
    out = tmp_path / "shapes"
    assert cli.main(["evaluate", "--workdir", run_dir, "--suite", "shapes", "--limit", "2", "--steps", "2",
                     "--text_steps", "3", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["suite"] == "shapes" and result["step"] == 0
    assert set(result["scores"]) == set(TASKS)
    for task, scores in result["scores"].items():
        assert scores["n"] == 2 and 0.0 <= scores[S.PRIMARY[task]] <= 1.0
    assert (out / "results.json").exists() and (out / "t2i.png").exists() and (out / "vqa.jsonl").exists()
    captions = [json.loads(line) for line in (out / "caption.jsonl").read_text().splitlines()]
    assert [c["question"] for c in captions] == ["What shapes?"] * 2  # the demo's caption prompt


def test_evaluate_semgen_writes_the_official_tree(run_dir, tmp_path, capsys):
    out = tmp_path / "results"
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "semgen_bench")  # 8 items
    assert cli.main(["evaluate", "--workdir", run_dir, "--suite", "semgen", "--limit", "2", "--steps", "2",
                     "--data", data, "--out", str(out), "--method", "tiny", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["items"] == 2 and result["tasks"]["edit_multi"]["guidance"] == 9.0
    assert result["tasks"]["t2i_long"]["guidance"] == 7.0
    from PIL import Image

    found = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    want = sorted([f"tiny/fullset/{t}/{k}.png" for t in ("t2i_long", "t2i_complex", "edit_multi", "edit_complex")
                   for k in (0, 1)] + [f"tiny/fullset/{t}/{k}_SRCIMG.png" for t in ("edit_multi", "edit_complex")
                                       for k in (0, 1)])
    assert found == want
    assert Image.open(out / "tiny/fullset/edit_complex/1.png").size == (32, 32)
    assert Image.open(out / "tiny/fullset/edit_complex/1_SRCIMG.png").mode == "RGB"


@pytest.mark.parametrize("case", ["no_workdir", "semgen_data", "semgen_no_data", "val_loss_task"])
def test_evaluate_bad_input_exits_2(case, run_dir, tmp_path, capsys):
    args = {
        "no_workdir": ["--workdir", str(tmp_path / "nope"), "--suite", "shapes"],
        "semgen_data": ["--workdir", run_dir, "--suite", "semgen", "--data", str(tmp_path)],
        "semgen_no_data": ["--workdir", run_dir, "--suite", "semgen"],
        "val_loss_task": ["--workdir", run_dir, "--suite", "val_loss", "--tasks", "t2i,sing"],
    }[case]
    assert cli.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unialignment evaluate: ") and len(err.splitlines()) == 1
    if case == "semgen_no_data":
        assert "--data" in err and "SemGen-Bench" in err
