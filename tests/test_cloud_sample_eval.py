"""`sample`, `evaluate`, `--config` and `tokenizer.path` on gs:// paths, served by the in-memory
bucket of tests/fake_bucket.py (an fsspec filesystem registered for gs://, which, like a bucket,
cannot append).

The run is test_sampling.py's tiny random run (demo.py:tiny, written as the trainer leaves it) copied
into the bucket; the commands get only gs:// paths (workdir, --image, --out, --data) and their
outputs must land in the bucket. Orbax's array reads go to GCS through TensorStore's own driver
(and ask google-cloud-storage about the bucket), which no in-memory filesystem can serve: here
`restore_params` restores from a local copy of the bucket's checkpoint directory, after recording
that the command handed it the gs:// directory itself.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os

import numpy as np
import pytest
from etils import epath
from PIL import Image

from unialignment_jax import cli, paths
from unialignment_jax import config as config_lib
from unialignment_jax.training import checkpoint as checkpoint_lib

from fake_bucket import FakeBucket  # the in-memory gs:// (conftest.py: the `bucket` fixture)
from test_sampling import perturbed_params, write_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"{ROOT}/experiments/demo.py:tiny"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from unialignment_jax.parallel import mesh as mesh_lib
    from unialignment_jax.parallel import rules as rules_lib

    config = config_lib.load(TINY)
    mesh = mesh_lib.make_mesh(config.mesh)
    _, params = perturbed_params(config, mesh, rules_lib.get_rules(config.sharding.rules))
    workdir = str(tmp_path_factory.mktemp("cloud_run") / "tiny")
    write_run(workdir, config, params)
    return workdir


@pytest.fixture
def remote_run(bucket, local_run, monkeypatch):
    """The tiny run at gs://test-bucket/runs/tiny; returns (workdir, the checkpoint dirs restored)."""
    workdir = f"{bucket}/runs/tiny"
    paths.copy_tree(local_run, workdir)
    real, seen = checkpoint_lib.restore_params, []

    def restore_params(directory, *args, **kwargs):
        seen.append(os.fspath(directory))
        with paths.local_copy(directory) as local:
            return real(local, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib, "restore_params", restore_params)
    return workdir, seen


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(epath.Path(path).read_bytes())))


def _in_bucket(prefix: str) -> list[str]:
    return sorted(k[len(prefix) + 1:] for k in FakeBucket.store if k.startswith(prefix + "/"))


def test_sample_reads_and_writes_the_bucket(remote_run, capsys):
    workdir, seen = remote_run
    out = "gs://test-bucket/samples"
    assert cli.main(["sample", "--workdir", workdir, "--task", "t2i", "--prompt", "a large red circle at the center.",
                     "--steps", "2", "--out", f"{out}/a.png"]) == 0, capsys.readouterr().err
    assert seen == [f"{workdir}/checkpoints"]
    img = _png(f"{out}/a.png")
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    # The condition image from the bucket, EMA weights, the answer written to the bucket.
    assert cli.main(["sample", "--workdir", workdir, "--task", "vqa", "--prompt", "What colour is the circle?",
                     "--image", f"{out}/a.png", "--steps", "3", "--ema", "--out", f"{out}/q.txt"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert epath.Path(f"{out}/q.txt").read_text().strip() == printed.strip()
    assert _in_bucket(out) == ["a.png", "q.txt"]


@pytest.mark.parametrize("case", ["no_workdir", "no_checkpoint", "no_image", "out_is_a_directory"])
def test_sample_bad_bucket_input_exits_2(case, remote_run, capsys):
    workdir, _ = remote_run
    empty = "gs://test-bucket/runs/empty"
    epath.Path(f"{empty}/config.json").write_bytes(epath.Path(f"{workdir}/config.json").read_bytes())
    epath.Path("gs://test-bucket/dir/x.txt").write_text("x")
    args = {
        "no_workdir": ["--workdir", "gs://test-bucket/runs/nope", "--task", "t2i", "--prompt", "x",
                       "--out", "gs://test-bucket/o.png"],
        "no_checkpoint": ["--workdir", empty, "--task", "t2i", "--prompt", "x", "--out", "gs://test-bucket/o.png"],
        "no_image": ["--workdir", workdir, "--task", "caption", "--image", "gs://test-bucket/missing.png",
                     "--out", "gs://test-bucket/o.png"],
        "out_is_a_directory": ["--workdir", workdir, "--task", "t2i", "--prompt", "x", "--out", "gs://test-bucket/dir"],
    }[case]
    assert cli.main(["sample", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unialignment sample: ") and len(err.splitlines()) == 1
    named = {"no_workdir": "gs://test-bucket/runs/nope", "no_checkpoint": f"{empty}/checkpoints",
             "no_image": "gs://test-bucket/missing.png", "out_is_a_directory": "gs://test-bucket/dir"}[case]
    assert named in err
    assert not epath.Path("gs://test-bucket/o.png").exists()


def _semgen_data(root: str, n: int = 2) -> None:
    """A SemGen-Bench folder with `n` items (the released layout: jsonl + images/<image_id>.jpg)."""
    lines = []
    for i in range(1, n + 1):
        lines.append(json.dumps({"image_id": i, "t2i_long": f"a long prompt {i}",
                                 "t2i_complex": f"a complex prompt {i}", "edit_multi": f"make it blue {i}",
                                 "edit_complex": f"move it left {i}"}))
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
        epath.Path(f"{root}/images/{i}.jpg").write_bytes(buf.getvalue())
    epath.Path(f"{root}/semgen_bench.jsonl").write_text("\n".join(lines) + "\n")


def test_evaluate_suites_on_a_bucket_run(remote_run, capsys):
    workdir, seen = remote_run
    # val_loss: the default --out is inside the (bucket) workdir.
    assert cli.main(["evaluate", "--workdir", workdir, "--suite", "val_loss", "--tasks", "t2i", "--limit", "8",
                     "--batch", "8", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["out"] == f"{workdir}/eval/val_loss_step0" and result["scores"]["t2i"]["n"] == 8
    saved = json.loads(epath.Path(f"{workdir}/eval/val_loss_step0/results.json").read_text())
    assert saved["scores"] == result["scores"]

    # shapes: a bucket --out with the grids, the texts and results.json.
    out = "gs://test-bucket/eval/shapes"
    assert cli.main(["evaluate", "--workdir", workdir, "--suite", "shapes", "--tasks", "t2i,vqa", "--limit", "2",
                     "--steps", "2", "--text_steps", "3", "--out", out, "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["scores"]) == {"t2i", "vqa"} and result["out"] == out
    assert _in_bucket(out) == ["results.json", "t2i.png", "vqa.jsonl"]
    assert len(epath.Path(f"{out}/vqa.jsonl").read_text().splitlines()) == 2
    assert _png(f"{out}/t2i.png").ndim == 3

    # semgen: the benchmark read from the bucket, the official tree written to W/results/<method>.
    data = "gs://test-bucket/semgen_bench"
    _semgen_data(data)
    assert cli.main(["evaluate", "--workdir", workdir, "--suite", "semgen", "--data", data, "--limit", "2",
                     "--tasks", "t2i_long,edit_multi", "--steps", "2", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["items"] == 2 and result["out"] == f"{workdir}/results/tiny"
    assert _in_bucket(f"{workdir}/results") == sorted(
        [f"tiny/fullset/{t}/{k}.png" for t in ("t2i_long", "edit_multi") for k in (0, 1)]
        + [f"tiny/fullset/edit_multi/{k}_SRCIMG.png" for k in (0, 1)])
    assert _png(f"{workdir}/results/tiny/fullset/edit_multi/1_SRCIMG.png").shape == (32, 32, 3)
    assert seen == [f"{workdir}/checkpoints"] * 3


def test_evaluate_bad_bucket_data_exits_2(remote_run, capsys):
    workdir, _ = remote_run
    assert cli.main(["evaluate", "--workdir", workdir, "--suite", "semgen", "--data", "gs://test-bucket/none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unialignment evaluate: ") and "gs://test-bucket/none/semgen_bench.jsonl" in err
    assert not _in_bucket(f"{workdir}/results")


def test_config_file_from_the_bucket(bucket):
    overrides = ["--config.model.num_heads=2", "--config.stages.generation.steps=7"]
    local = config_lib.load(TINY, overrides)
    paths.copy_tree(f"{ROOT}/experiments/demo.py", f"{bucket}/exp/demo.py")
    remote = config_lib.load(f"{bucket}/exp/demo.py:tiny", overrides)
    assert remote.to_dict() == local.to_dict() and remote.stages.generation.steps == 7
    default = config_lib.load(f"{ROOT}/experiments/demo.py")  # no variant
    assert config_lib.load(f"{bucket}/exp/demo.py").to_dict() == default.to_dict()
    with pytest.raises(config_lib.ConfigError, match=f"{bucket}/exp/nope.py: no such file"):
        config_lib.load(f"{bucket}/exp/nope.py:tiny")
    with pytest.raises(config_lib.ConfigError, match="model.nope"):
        config_lib.load(f"{bucket}/exp/demo.py:tiny", ["--config.model.nope=1"])
    # Through the command line: a remote --config is a usage error only when it is missing.
    assert cli.main(["train", "--config", f"{bucket}/exp/nope.py", "--workdir", f"{bucket}/runs/x"]) == 2
    assert not epath.Path(f"{bucket}/runs/x").exists()


def test_sentencepiece_model_from_the_bucket(bucket, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from unialignment_jax.data.tokenizers import SentencePieceTokenizer, build_tokenizer

    corpus = ["a red circle on a blue square", "the green triangle is left of the yellow star",
              "move the circle up", "What colour is the square? It is blue."] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=290, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    paths.copy_tree(tmp_path / "spiece.model", f"{bucket}/tok/spiece.model")
    local = SentencePieceTokenizer(str(tmp_path / "spiece.model"))
    remote = build_tokenizer({"kind": "sentencepiece", "path": f"{bucket}/tok/spiece.model"})
    texts = ["a red circle on a blue square", "move the star <extra_id_0> left"]
    np.testing.assert_array_equal(remote.encode(texts, 16), local.encode(texts, 16))
    assert remote.vocab_size == local.vocab_size and remote.path == f"{bucket}/tok/spiece.model"
    with pytest.raises(ValueError, match=f"{bucket}/tok/missing.model"):
        SentencePieceTokenizer(f"{bucket}/tok/missing.model")


def test_bucket_checkpoint_without_the_bucket_client_exits_2(bucket, local_run, capsys):
    """Orbax asks google-cloud-storage about a gs:// bucket before reading a checkpoint there:
    without it, `sample` is a usage error that says what to install (not an ImportError trace)."""
    try:
        has_client = importlib.util.find_spec("google.cloud.storage") is not None
    except ImportError:  # (no google.cloud namespace at all)
        has_client = False
    if has_client:
        pytest.skip("google-cloud-storage is installed: Orbax would ask the real GCS about the bucket")
    workdir = f"{bucket}/runs/tiny"
    paths.copy_tree(local_run, workdir)
    assert cli.main(["sample", "--workdir", workdir, "--task", "t2i", "--prompt", "x", "--steps", "2",
                     "--out", f"{bucket}/o.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unialignment sample: {workdir}/checkpoints: ") and "google-cloud-storage" in err
    assert not epath.Path(f"{bucket}/o.png").exists()
