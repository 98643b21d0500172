"""Cloud paths: every path the CLI takes may be a gs:// URI (etils epath). Tested with local paths and
with `gs://` served by an in-memory fsspec filesystem registered for that scheme (what gcsfs does
for real buckets), which, like a bucket, cannot append to an object.

Not covered offline: Orbax's array data (TensorStore has its own GCS driver) and ArrayRecord reads
(their C++ file layer), which talk to GCS directly; so the export / import round trip below keeps
the run's --workdir local."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from etils import epath

from fake_bucket import FakeBucket  # the in-memory gs:// (conftest.py: the `bucket` fixture)
from unialignment_jax import paths
from unialignment_jax.data import shapes_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:  # the tiny trained run of the export tests (a module fixture: trained once for this module)
    from tests.test_export import run_dir  # noqa: F401
except pytest.skip.Exception:  # torch / diffusers not installed: the round trip test skips
    run_dir = None


def test_helpers_keep_uris_and_local_paths(tmp_path):
    assert paths.is_remote("gs://b/x") and paths.is_remote("s3://b/x") and not paths.is_remote("/a/b")
    assert not paths.is_remote("file:///a/b") and not paths.is_remote("runs/x")
    assert paths.absolute("gs://b/x") == "gs://b/x" and paths.absolute("x") == os.path.abspath("x")
    assert paths.join("gs://b/data", "img/1.png") == "gs://b/data/img/1.png"
    assert paths.join("gs://b/data", "/abs/1.png") == "/abs/1.png"
    assert paths.join("/root", "img", "1.png") == "/root/img/1.png"
    assert paths.join("/root", "gs://b/1.png") == "gs://b/1.png"
    assert paths.parent("gs://b/data/m.jsonl") == "gs://b/data" and paths.parent("/a/m.jsonl") == "/a"
    with paths.local_copy(tmp_path) as local:
        assert local == os.fspath(tmp_path)


def test_copy_stage_and_fetch_through_a_bucket(bucket, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    (src / "z_marker.json").write_text("{}")
    paths.copy_tree(src, f"{bucket}/tree", last=("a.txt",))
    assert epath.Path(f"{bucket}/tree/sub/b.bin").read_bytes() == b"\x00\x01"
    # The marker named in `last` is written after everything else in its directory.
    order = [k for k in FakeBucket.store if k.startswith("gs://test-bucket/tree/") and k.count("/") == 4]
    assert order[-1].endswith("a.txt"), order
    with paths.local_copy(f"{bucket}/tree") as local:
        assert sorted(os.listdir(local)) == ["a.txt", "sub", "z_marker.json"]
        assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == b"\x00\x01"
    assert not os.path.exists(local)  # the temporary copy is gone
    with paths.staged_output(f"{bucket}/out") as out:
        os.makedirs(out)
        open(os.path.join(out, "weights.safetensors"), "wb").write(b"123")
    assert epath.Path(f"{bucket}/out/weights.safetensors").read_bytes() == b"123"
    with pytest.raises(RuntimeError):
        with paths.staged_output(f"{bucket}/failed") as out:
            os.makedirs(out)
            open(os.path.join(out, "partial"), "wb").write(b"x")
            raise RuntimeError("the writer failed")
    assert not epath.Path(f"{bucket}/failed").exists()  # nothing uploaded on failure


def _upload(local_dir, remote_dir):
    paths.copy_tree(local_dir, remote_dir)


def test_prepare_reads_and_writes_bucket_paths(bucket, tmp_path, capsys):
    """`prepare --manifest gs://... --images-root gs://... --out gs://...`: the same dataset as from
    local paths."""
    from unialignment_jax.data import prepare, prepare_args
    from unialignment_jax.data.records import find_dataset_dir, open_prepared

    manifest = shapes_tasks.write_official("edit", "train", 5, str(tmp_path / "src"), resolution=32)
    _upload(tmp_path / "src", f"{bucket}/src")
    remote_manifest = f"{bucket}/src/{os.path.relpath(manifest, tmp_path / 'src')}"
    out = f"{bucket}/datasets/edit"
    args = prepare_args.build_parser().parse_args(
        ["--manifest", remote_manifest, "--images-root", paths.parent(remote_manifest), "--out", out, "--task", "edit"])
    assert prepare.run(args, None) == 0, capsys.readouterr().err
    assert "rows written: 5" in capsys.readouterr().out
    assert epath.Path(f"{out}/dataset_info.json").exists()
    assert find_dataset_dir(out) == out
    with paths.local_copy(out) as local:  # what a reader without a bucket driver would do
        _, spec = open_prepared(local)
        assert spec.task == "edit" and spec.num_cond == 1
        report = json.load(open(os.path.join(local, "prepare_report.json")))
        assert report["written"] == 5
    # --out on an existing bucket dataset needs --overwrite; a missing manifest is a usage error.
    args = prepare_args.build_parser().parse_args(["--manifest", remote_manifest, "--out", out, "--task", "edit"])
    assert prepare.run(args, None) == 2
    args = prepare_args.build_parser().parse_args(["--manifest", f"{bucket}/nope.jsonl", "--out", out + "2",
                                                   "--task", "edit"])
    assert prepare.run(args, None) == 2
    assert "no such file" in capsys.readouterr().err


def test_metrics_on_a_bucket_workdir_are_staged_and_resumed(bucket):
    """tensorboardX writes local files only and a bucket cannot append: metrics are written in a
    local staging directory and mirrored; a resumed run continues the bucket's metrics.jsonl."""
    from unialignment_jax.training.metrics import MetricWriter

    workdir = epath.Path(f"{bucket}/runs/r1")
    w = MetricWriter(workdir, sync_secs=3600)
    w.write_scalars(1, {"loss": 2.0}, stage="s", task="t2i")
    w.flush()
    assert json.loads((workdir / "metrics.jsonl").read_text())["loss"] == 2.0
    w.write_scalars(2, {"loss": 1.5}, stage="s", task="t2i")
    staging = w._remote[1]
    w.close()
    assert not staging.exists()
    events = [p.name for p in (workdir / "tb").iterdir()]
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    w = MetricWriter(workdir, sync_secs=3600)  # resume
    w.write_scalars(3, {"loss": 1.0}, stage="s", task="t2i")
    w.close()
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert len(list((workdir / "tb").iterdir())) == 2


def test_metrics_on_a_local_workdir_write_in_place(tmp_path):
    from unialignment_jax.training.metrics import MetricWriter

    w = MetricWriter(epath.Path(tmp_path), sync_secs=0)
    w.write_scalars(1, {"loss": 2.0})
    w.close()
    assert w._remote is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1


def _in_bucket(prefix):
    return [k for k in FakeBucket.store if k.startswith(prefix.rstrip("/") + "/")]


def test_safetensors_and_encoder_files_read_from_a_bucket(bucket, tmp_path):
    """Checkpoint / SafetensorsFile / the mask row on gs://: tensor by tensor, errors naming the file."""
    from unialignment_jax.interop import encoder_import
    from unialignment_jax.interop.safetensors_io import Checkpoint, CheckpointFormatError
    from unialignment_jax.interop.safetensors_write import save_file

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    (tmp_path / "ckpt").mkdir()
    save_file(str(tmp_path / "ckpt" / "part-1.safetensors"), {"a": a})
    save_file(str(tmp_path / "ckpt" / "part-2.safetensors"), {"b": b})
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}))
    save_file(str(tmp_path / "row.safetensors"), {"mask_token_emb": b})
    np.save(tmp_path / "row.npy", b)
    data = (tmp_path / "ckpt" / "part-1.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-4])
    _upload(tmp_path, f"{bucket}/enc")

    ckpt = Checkpoint(f"{bucket}/enc/ckpt")  # a folder with a sharded index
    assert ckpt.path == f"{bucket}/enc/ckpt/model.safetensors.index.json"
    assert ckpt.file_of("b") == f"{bucket}/enc/ckpt/part-2.safetensors"
    np.testing.assert_array_equal(ckpt.array("a"), a)
    np.testing.assert_array_equal(ckpt.array("b"), b)
    for name in ("row.npy", "row.safetensors"):
        np.testing.assert_array_equal(encoder_import.read_mask_embedding(f"{bucket}/enc/{name}", 16), b)
    with pytest.raises(CheckpointFormatError, match=f"{bucket}/enc/truncated.safetensors.*truncated"):
        Checkpoint(f"{bucket}/enc/truncated.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/enc/nothing"):
        Checkpoint(f"{bucket}/enc/nothing")
    with pytest.raises(FileNotFoundError, match="codec.weights"):
        encoder_import.load_vae(f"{bucket}/enc/nothing")


@pytest.mark.slow
def test_export_to_and_import_from_a_bucket(bucket, request, tmp_path, monkeypatch, capsys):
    """`export --out gs://...` of test_export.py's tiny run and `import --source gs://...` of it:
    the round trip is bit-exact; an export that fails half-way (while writing, or while uploading)
    leaves nothing at --out; a non-empty bucket --out is refused."""
    if run_dir is None:
        pytest.skip("torch / diffusers are not installed (tests/test_export.py)")
    from tests.test_export import SPEC, assert_params_bit_equal, break_export_half_way, export_cli, restored
    from unialignment_jax import cli
    from unialignment_jax.interop import export

    run = request.getfixturevalue("run_dir")
    out = f"{bucket}/exports/tiny"
    assert export_cli(run["workdir"], out) == 0, capsys.readouterr().err
    info = json.loads(epath.Path(f"{out}/export_info.json").read_text())
    assert info["source_step"] == 4 and info["source_workdir"] == str(run["workdir"])
    uploaded = _in_bucket(out)
    assert sorted(k[len(out) + 1:] for k in uploaded) == sorted(info["files"])
    assert uploaded[-1].endswith(export.INFO_FILE)  # the marker last
    assert export_cli(run["workdir"], out) == 2  # never overwrites, in a bucket either
    assert "not an empty directory" in capsys.readouterr().err

    again = tmp_path / "again"
    assert cli.main(["import", "--source", out, "--config", SPEC, "--workdir", str(again), "--log_level", "WARNING",
                     *run["overrides"]]) == 0, capsys.readouterr().err
    report = json.loads((again / "import_report.json").read_text())
    assert report["kind"] == "official" and not report["reinitialised"] and not report["dropped"]
    assert report["source"] == f"{out}/transformer/diffusion_pytorch_model.safetensors"
    assert (again / "mask_token_emb.safetensors").read_bytes() == \
        epath.Path(f"{out}/mask_token_emb.safetensors").read_bytes()
    _, _, original, _ = restored(run["workdir"])
    _, _, imported, step = restored(again)
    assert step == 0
    assert_params_bit_equal(original, imported)

    # Fails while writing: nothing is uploaded.
    half = f"{bucket}/exports/half"
    break_export_half_way(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_run(str(run["workdir"]), half)
    assert not _in_bucket(half) and not epath.Path(half).exists()
    monkeypatch.undo()

    # Fails while uploading (before the marker): what was uploaded is removed.
    real_copy, copied = paths.copy_tree, []

    def upload_breaks(src, dst, last=()):
        if os.fspath(dst).endswith(export.INFO_FILE):
            raise OSError("connection reset")
        if not os.path.isdir(src):
            copied.append(os.fspath(dst))
        real_copy(src, dst, last)

    monkeypatch.setattr(paths, "copy_tree", upload_breaks)
    with pytest.raises(OSError, match="connection reset"):
        export.export_run(str(run["workdir"]), half)
    assert len(copied) >= 5  # (the weights, configs and mask row had been uploaded)
    assert not _in_bucket(half) and not epath.Path(half).exists()
    monkeypatch.undo()

    # A missing bucket source: a usage error naming it.
    assert cli.main(["import", "--source", f"{bucket}/nothing", "--config", SPEC, "--workdir",
                     str(tmp_path / "never"), *run["overrides"]]) == 2
    assert f"{bucket}/nothing" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_tokenizer_file_here_sees_bucket_files(bucket):
    """inspect / bench build the real tokenizer when its file exists, also in a bucket."""
    import ml_collections

    from unialignment_jax.training.encoders import tokenizer_file_here

    cfg = lambda kind, path="": ml_collections.ConfigDict({"tokenizer": {"kind": kind, "path": path}})
    assert tokenizer_file_here(cfg("byte")) and tokenizer_file_here(cfg("words"))
    assert not tokenizer_file_here(cfg("sentencepiece"))
    assert not tokenizer_file_here(cfg("sentencepiece", f"{bucket}/spiece.model"))
    epath.Path(f"{bucket}/spiece.model").write_bytes(b"x")
    assert tokenizer_file_here(cfg("sentencepiece", f"{bucket}/spiece.model"))


# ----------------------------------------- what users type: relative, ~, spaces, trailing slash, symlinks


def test_absolute_takes_what_users_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.absolute("runs/demo") == str(tmp_path / "runs" / "demo")
    assert paths.absolute("runs/demo/") == paths.absolute("./runs/../runs/demo") == str(tmp_path / "runs" / "demo")
    assert paths.absolute("~/runs/x") == str(tmp_path / "home" / "runs" / "x")
    assert paths.absolute("my runs/x y") == str(tmp_path / "my runs" / "x y")
    assert paths.absolute("gs://b/runs/x/") == "gs://b/runs/x" and paths.absolute("gs://b") == "gs://b"
    assert paths.absolute("") == ""
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert paths.absolute("link/run") == str(tmp_path / "link" / "run")  # the link is kept, not resolved


def test_cli_makes_every_path_argument_absolute(tmp_path, monkeypatch):
    from unialignment_jax import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    parser = cli.build_parser()
    cases = {
        "sample": ["--workdir", "runs/demo/", "--task", "edit", "--image", "a.png", "b.png", "--out", "~/o.png"],
        "evaluate": ["--workdir", "runs/demo", "--suite", "semgen", "--data", "bench dir", "--out", "results"],
        "export": ["--workdir", "runs/demo", "--out", "gs://b/out/"],
        "import": ["--source", "weights/sd3", "--config", "c.py", "--workdir", "runs/new"],
        "prepare": ["--manifest", "m1.jsonl", "--manifest", "m2.jsonl", "--images-root", "imgs", "--out", "data/t2i",
                    "--task", "t2i", "--teacher-path", "~/qwen"],
        "train": ["--config", "c.py", "--workdir", "runs/demo"],
    }
    for command, argv in cases.items():
        args, _ = parser.parse_known_args([command, *argv])
        cli.make_path_arguments_absolute(args)
        for name in cli.PATH_ARGUMENTS:
            value = getattr(args, name, None)
            for v in (value if isinstance(value, list) else [value]):
                if v is not None:
                    assert v == paths.absolute(v) and (os.path.isabs(v) or v.startswith("gs://")), (command, name, v)
    args, _ = parser.parse_known_args(["sample", *cases["sample"]])
    cli.make_path_arguments_absolute(args)
    assert args.workdir == str(tmp_path / "runs" / "demo") and args.out == str(tmp_path / "home" / "o.png")
    assert args.image == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_config_paths_are_made_absolute_where_the_command_starts(tmp_path, monkeypatch):
    from unialignment_jax import config as config_lib

    monkeypatch.chdir(tmp_path)
    config = config_lib.load(f"{ROOT}/experiments/unialignment_2b.py", [
        "--config.data.edit=data/edit:3,gs://b/perception/,data/more/",
        "--config.data.t2i=shapes",
        "--config.text_encoder.mask_embedding=~/mask row.npy",
        "--config.sample.prompts=prompts/grid.txt",
    ])
    assert config.sample.prompts == str(tmp_path / "prompts" / "grid.txt")
    assert config.text_encoder.weights == str(tmp_path / "weights" / "t5")
    assert config.tokenizer.path == str(tmp_path / "weights" / "t5" / "spiece.model")
    assert config.codec.weights == str(tmp_path / "weights" / "sd3_vae")
    assert config.text_encoder.mask_embedding == os.path.expanduser("~/mask row.npy")
    assert config.data.edit == f"{tmp_path}/data/edit:3,gs://b/perception,{tmp_path}/data/more"
    assert config.data.t2i == "shapes" and config.data.caption == str(tmp_path / "data" / "caption")
    assert not config.compilation_cache_dir.startswith("~")
    os.makedirs(tmp_path / "home" / "exp")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with open(tmp_path / "home" / "exp" / "demo.py", "w") as f:
        f.write(open(f"{ROOT}/experiments/demo.py").read())
    assert config_lib.load("~/exp/demo.py:tiny").model.num_layers == 2  # `--config=~/...` gets no shell expansion
    with pytest.raises(config_lib.ConfigError, match="config.data.vqa"):
        config_lib.load(f"{ROOT}/experiments/unialignment_2b.py", ["--config.data.vqa=data/vqa:-1"])


def test_checkpoints_under_relative_spaced_and_symlinked_directories(tmp_path, monkeypatch):
    """Orbax refuses relative paths: the Checkpointer makes its directory absolute itself."""
    import jax
    import jax.numpy as jnp

    from unialignment_jax.training import checkpoint as checkpoint_lib
    from unialignment_jax.training.state import TrainState

    (tmp_path / "real dir").mkdir()
    os.symlink(tmp_path / "real dir", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    state = TrainState(step=jnp.asarray(3), params={"w": jnp.arange(4.0)}, opt_state={"mu": jnp.zeros(4)},
                       ema=None, rng=jnp.asarray([0, 1], jnp.uint32), nonfinite=jnp.asarray(0))
    for directory in ("runs/a b/checkpoints/", "link/run/checkpoints"):
        ckpt = checkpoint_lib.Checkpointer(directory, keep_last=2, async_save=False)
        ckpt.save(state, {"step": 3}, force=True)
        ckpt.close()
        params, step, meta = checkpoint_lib.restore_params(directory, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
        assert step == 3 and meta == {"step": 3} and params["w"].tolist() == [0, 1, 2, 3]
    assert (tmp_path / "real dir" / "run" / "checkpoints" / "3").is_dir()
