"""`unialignment prepare`: official manifests -> ArrayRecord (TFDS) -> Grain batches; bad rows;
atomic writes; latents through the pixel codec; sharding."""

import glob
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from unialignment_jax import cli, progress
from unialignment_jax.config import base_config
from unialignment_jax.data import images as image_lib
from unialignment_jax.data.batching import make_iterator
from unialignment_jax.data.decode import example_format
from unialignment_jax.data.sources import prepared_source
from unialignment_jax.data import prepare, prepare_rows
from unialignment_jax.data import shapes as S
from unialignment_jax.data import shapes_tasks
from unialignment_jax.data.records import open_prepared, text
from unialignment_jax.data.tokenizers import build_tokenizer
from unialignment_jax.tasks import TASKS, num_conditions

# 8 SemGen-Bench items (real COCO photographs) shipped with the tests (tests/data/README.md)
SEMGEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "semgen_bench")


def small_config(resolution=32, text_length=128):
    c = base_config()
    c.tokenizer.kind = "byte"
    c.input.resolution = resolution
    c.input.latent_downsample = 4
    c.input.text_length = text_length
    c.model.adapter_out = 16
    c.batch_size = 4
    return c


def run_prepare(argv, config=None, capsys=None):
    """In-process, with the CLI's own parser for `unialignment prepare` (the config given as an object)."""
    args, rest = cli.build_parser().parse_known_args(["prepare", *argv])
    assert not rest, rest
    rc = prepare.run(args, config)
    out = capsys.readouterr() if capsys else None
    return rc, out


def read_all(path, task, config, split="train", batch=4):
    """Every example of a prepared dataset, in dataset order, through the Grain pipeline."""
    src = prepared_source(path, split)
    fmt = example_format(task, [src.spec], config.input.resolution, config.input.text_length, config.tokenizer)
    it = make_iterator([src], fmt, batch, shuffle=False, num_epochs=1, drop_remainder=False, read_threads=2)
    batches = list(it)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, it


@pytest.mark.parametrize("task", TASKS)
def test_official_format_round_trips_to_batches(task, tmp_path, capsys):
    config = small_config()
    n = 6
    manifest = shapes_tasks.write_official(task, "train", n, str(tmp_path / "src"), resolution=32)
    out = str(tmp_path / "ds")
    rc, cap = run_prepare(["--manifest", manifest, "--out", out, "--task", task, "--teacher", "shapes"],
                          config, capsys)
    assert rc == 0, cap.err
    assert "rows read:    6" in cap.out and "rows written: 6" in cap.out
    builder, spec = open_prepared(out)
    assert spec.task == task and spec.num_cond == num_conditions(task, 3) and spec.teacher_dim == 16
    batch, it = read_all(out, task, config)
    assert batch["target"].shape == (n, 32, 32, 3) and batch["caption_ids"].shape == (n, 128)
    assert it.skipped_records == 0
    tok = build_tokenizer(config.tokenizer)
    teacher = S.ShapesTeacher(16)
    examples = [shapes_tasks.make_example(task, "train", i) for i in range(n)]
    matched = set()
    for b in range(n):  # TFDS stores records in a hashed order: match each row to its example
        hits = [i for i, ex in enumerate(examples)
                if np.array_equal(batch["target"][b], image_lib.normalize(S.render(ex.target, 32)))
                and tok.decode(batch["caption_ids"][b])[0] == (ex.question + ex.caption if task == "vqa" else ex.caption)]
        assert hits, f"row {b} matches no example"
        i = hits[0]
        matched.add(i)
        ex = examples[i]
        if task in ("t2i", "edit", "perception", "compose"):
            prompt = ex.caption if task == "t2i" else ex.instruction
            np.testing.assert_array_equal(batch["prompt_ids"][b], tok.encode([prompt], 128)[0])
        else:
            assert "prompt_ids" not in batch
        if task == "vqa":
            q = tok.encode([ex.question], 128)[0]
            k = int(np.flatnonzero(q == tok.eos_id)[0]) + 1
            assert batch["prefix_len"][b] == k
            np.testing.assert_array_equal(batch["caption_ids"][b, :k], q[:k])
        else:
            assert batch["prefix_len"][b] == 0
            np.testing.assert_array_equal(batch["caption_ids"][b], tok.encode([ex.caption], 128)[0])
        if ex.conds:
            want = np.stack([image_lib.normalize(S.render(c, 32)) for c in ex.conds])
            np.testing.assert_array_equal(batch["cond"][b], want)
        # exact teacher features: the same through prepare (from pixels / text) as in memory
        np.testing.assert_array_equal(batch["teacher_image"][b], teacher.scene_image_feature(ex.target).astype(np.float32))
        rec = shapes_tasks.ShapesSource(task, "train", teacher_dim=16)[i]
        np.testing.assert_array_equal(batch["teacher_text"][b], rec["teacher_text"].astype(np.float32))
    assert matched == set(range(n))
    # a few decoded pixels and token ids, literally
    ex = examples[0]
    img = S.render(ex.target, 32)
    assert img[16, 16].tolist() in ([0, 0, 0], *[list(c) for c in S.COLOURS.values()], *[list(c) for c in
                                     S.SEG_COLOURS.values()], *[list(c) for c in S.DEPTH_COLOURS.values()])
    assert tok.encode(["a b"], 4)[0].tolist() == [ord("a") + 3, ord(" ") + 3, ord("b") + 3, 1]


def semgen_manifest(path, ids):
    rows = [json.loads(line) for line in open(os.path.join(SEMGEN, "semgen_bench.jsonl"))]
    by_id = {r["image_id"]: r for r in rows}
    with open(path, "w") as f:
        for i in ids:
            r = by_id[i]
            img = f"images/{i}.jpg"
            f.write(json.dumps({"image": [img, img], "instruction": r["edit_complex"],
                                "conversations": [{"from": "human", "value": r["t2i_long"]},
                                                  {"from": "gpt", "value": "<image>"}]}) + "\n")
    return by_id


def test_semgen_bench_images_as_edit_manifest(tmp_path, capsys):
    ids = sorted(int(os.path.splitext(f)[0]) for f in os.listdir(os.path.join(SEMGEN, "images")))
    assert len(ids) == 8
    manifest = str(tmp_path / "semgen_edit.jsonl")
    by_id = semgen_manifest(manifest, ids)
    config = small_config(resolution=32, text_length=256)
    out = str(tmp_path / "semgen")
    rc, cap = run_prepare(["--manifest", manifest, "--images-root", SEMGEN, "--out", out, "--task", "edit",
                           "--resolution", "32", "--image-format", "png"], config, capsys)
    assert rc == 0, cap.err
    assert "rows written: 8" in cap.out and "rows skipped: 0" in cap.out
    batch, _ = read_all(out, "edit", config, batch=8)
    assert batch["target"].shape == (8, 32, 32, 3) and batch["cond"].shape == (8, 1, 32, 32, 3)
    tok = build_tokenizer(config.tokenizer)
    instructions = {tok.decode(batch["prompt_ids"][b])[0]: b for b in range(8)}
    for i in (1, 2, 77, 150):  # a few rows: official resize + crop, pixels and tokens exact
        r = by_id[i]
        b = instructions[r["edit_complex"]]
        want = image_lib.resize_center_crop(Image.open(os.path.join(SEMGEN, "images", f"{i}.jpg")).convert("RGB"), 32)
        want = image_lib.normalize(np.asarray(want))
        np.testing.assert_array_equal(batch["target"][b], want)
        np.testing.assert_array_equal(batch["cond"][b, 0], want)
        np.testing.assert_array_equal(batch["caption_ids"][b], tok.encode([r["t2i_long"]], 256)[0])
        np.testing.assert_array_equal(batch["prompt_ids"][b], tok.encode([r["edit_complex"]], 256)[0])


def test_original_bytes_are_kept_and_resized_at_train_time(tmp_path, capsys):
    manifest = str(tmp_path / "m.jsonl")
    semgen_manifest(manifest, [3, 4, 5])
    out = str(tmp_path / "orig")
    rc, cap = run_prepare(["--manifest", manifest, "--images-root", SEMGEN, "--out", out, "--task", "edit"],
                          None, capsys)
    assert rc == 0, cap.err
    builder, spec = open_prepared(out)
    src = builder.as_data_source("train")
    rec = src[0]
    i = int(text(rec["key"]).split(":")[1]) + 2  # manifest line n holds image id n + 2
    assert rec["target_image"] == open(os.path.join(SEMGEN, "images", f"{i}.jpg"), "rb").read()
    config = small_config(resolution=48, text_length=256)
    batch, _ = read_all(out, "edit", config)
    assert batch["target"].shape == (3, 48, 48, 3)


def _png(size=(8, 8), colour=(10, 20, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(w=200_000, h=200_000):
    """A PNG header claiming a huge image (PIL's decompression-bomb check trips on open)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def bad_manifest(root):
    """An edit manifest with every kind of bad row; returns (path, good line numbers, bad {line: reason})."""
    os.makedirs(os.path.join(root, "img"))
    for name, data in {"a.png": _png(), "b.png": _png(colour=(200, 100, 0)), "c.png": _png((16, 12)),
                       "garbage.png": b"this is not an image at all", "big.png": _png((120, 120)),
                       "bomb.png": _bomb_png(), "cut.png": _png((64, 64))[:60]}.items():
        with open(os.path.join(root, "img", name), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(root, "img", "adir.png"))

    def row(src="img/a.png", tgt="img/b.png", instruction="make it orange", caption="a small square", **kw):
        r = {"image": [src, tgt], "conversations": [{"from": "human", "value": caption},
                                                   {"from": "gpt", "value": "<image>"}], "instruction": instruction}
        r.update(kw)
        return json.dumps(r).encode()

    lines = [
        (row(), None),
        (b'{"image": ["img/a.png", "img/b.png"], "instruction": ', "malformed JSON"),
        (row(caption="caf\u00e9").replace("caf\\u00e9".encode(), b"caf\xe9"), "non-UTF-8 text"),
        (row(instruction=5), "wrong field types"),
        (json.dumps({"image": ["img/a.png", "img/b.png"], "conversations": [{"value": "x"}]}).encode(), "missing field"),
        (row(instruction="   "), "empty text"),
        (row(src="img/nope.png"), "missing image"),
        (row(tgt="img/garbage.png"), "corrupt image"),
        (row(src="img/adir.png"), "unreadable image"),
        (row(tgt="img/big.png"), "image too large"),
        (row(caption="\ud800 lone surrogate"), "non-UTF-8 text"),
        (b"[1, 2, 3]", "wrong field types"),
        (row(src="img/c.png", caption="the second good row"), None),
        (b"   ", "blank"),
        (row(tgt="img/cut.png"), "corrupt image"),
        (row(tgt="img/bomb.png"), "image too large"),
        (row(image="img/a.png"), "wrong field types"),  # one path where two are needed
        (row(tgt="img/a.png", caption="the third good row"), None),
    ]
    path = os.path.join(root, "bad.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(raw for raw, _ in lines) + b"\n")
    good = [n for n, (_, why) in enumerate(lines, 1) if why is None]
    bad = {n: why for n, (_, why) in enumerate(lines, 1) if why not in (None, "blank")}
    return path, good, bad


def test_every_kind_of_bad_row_is_reported_and_skipped(tmp_path, capsys):
    manifest, good, bad = bad_manifest(str(tmp_path / "m"))
    out = str(tmp_path / "ds")
    argv = ["--manifest", manifest, "--out", out, "--task", "edit", "--max-image-pixels", "10000",
            "--resolution", "8"]
    rc, cap = run_prepare(argv, None, capsys)
    assert rc == 0, cap.err
    assert f"rows read:    {len(good) + len(bad)}" in cap.out
    assert f"rows written: {len(good)}" in cap.out
    assert f"rows skipped: {len(bad)}" in cap.out
    for line, reason in bad.items():
        assert f"bad.jsonl:{line}: {reason}" in cap.out, (line, reason, cap.out)
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    assert {b["line"]: b["reason"] for b in report["bad"]} == bad
    builder, _ = open_prepared(out)
    src = builder.as_data_source("train")
    assert sorted(int(text(src[i]["key"]).split(":")[1]) for i in range(len(src))) == good
    # --strict: the first bad row is fatal, nothing is written
    out2 = str(tmp_path / "strict")
    rc, cap = run_prepare(argv[:3] + [out2] + argv[4:] + ["--strict"], None, capsys)
    assert rc == 1
    assert "bad.jsonl:2: malformed JSON" in cap.err
    assert not os.path.exists(out2) and not glob.glob(out2 + ".*")
    # an existing output is refused (exit 2) unless --overwrite
    rc, cap = run_prepare(argv, None, capsys)
    assert rc == 2 and "exists" in cap.err


def test_interrupted_prepare_leaves_no_complete_looking_dataset(tmp_path, capsys, monkeypatch):
    manifest = shapes_tasks.write_official("t2i", "train", 6, str(tmp_path / "src"), resolution=32)
    out = str(tmp_path / "ds")
    from unialignment_jax.data import manifests

    real = manifests.process_line

    def interrupted(opts, key, line, raw):
        if line == 4:
            raise KeyboardInterrupt
        return real(opts, key, line, raw)

    monkeypatch.setattr(manifests, "process_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(["--manifest", manifest, "--out", out, "--task", "t2i"], None, capsys)
    assert not os.path.exists(out) and not glob.glob(out + ".*")
    # a complete dataset is replaced only by another complete one (--overwrite)
    monkeypatch.setattr(manifests, "process_line", real)
    assert run_prepare(["--manifest", manifest, "--out", out, "--task", "t2i"], None, capsys)[0] == 0
    monkeypatch.setattr(manifests, "process_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(["--manifest", manifest, "--out", out, "--task", "t2i", "--overwrite"], None, capsys)
    builder, _ = open_prepared(out)
    assert len(builder.as_data_source("train")) == 6 and not glob.glob(out + ".*")


def test_latents_through_the_pixel_codec(tmp_path, capsys):
    pytest.importorskip("unialignment_jax.models.encoders")
    config = small_config()
    config.codec.kind = "pixel"
    manifest = shapes_tasks.write_official("edit", "train", 5, str(tmp_path / "src"), resolution=32)
    out = str(tmp_path / "lat")
    rc, cap = run_prepare(["--manifest", manifest, "--out", out, "--task", "edit", "--latents"], config, capsys)
    assert rc == 0, cap.err
    _, spec = open_prepared(out)
    assert spec.storage == "latents" and spec.latent_shape == (8, 8, 48) and spec.resolution == 32
    batch, _ = read_all(out, "edit", config)
    assert set(batch) >= {"target_latents", "cond_latents"} and "target" not in batch
    assert batch["target_latents"].shape == (5, 8, 8, 48) and batch["cond_latents"].shape == (5, 1, 8, 8, 48)
    tok = build_tokenizer(config.tokenizer)
    for b in range(5):
        caption = tok.decode(batch["caption_ids"][b])[0]
        ex = next(e for e in (shapes_tasks.make_example("edit", "train", i) for i in range(5)) if e.caption == caption)
        px = image_lib.normalize(S.render(ex.target, 32))  # space-to-depth by 4, float16-rounded
        want = px.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(8, 8, 48)
        np.testing.assert_allclose(batch["target_latents"][b], want.astype(np.float16).astype(np.float32))


def test_shard_count_and_workers(tmp_path, capsys):
    manifest = shapes_tasks.write_official("caption", "train", 20, str(tmp_path / "src"), resolution=32)
    rc, _ = run_prepare(["--manifest", manifest, "--out", str(tmp_path / "k3"), "--task", "caption",
                         "--num-shards", "3", "--compression", "zstd"], None, capsys)
    assert rc == 0 and len(glob.glob(str(tmp_path / "k3" / "*.array_record-*"))) == 3
    rc, _ = run_prepare(["--manifest", manifest, "--out", str(tmp_path / "auto"), "--task", "caption",
                         "--workers", "2"], None, capsys)
    assert rc == 0 and len(glob.glob(str(tmp_path / "auto" / "*.array_record-*"))) == 8  # the default floor
    a = open_prepared(str(tmp_path / "k3"))[0].as_data_source("train")
    b = open_prepared(str(tmp_path / "auto"))[0].as_data_source("train")
    by_key = {text(a[i]["key"]): a[i] for i in range(len(a))}
    for i in range(len(b)):  # worker processes (and zstd chunks) give the same records as inline, uncompressed
        r = b[i]
        assert r["target_image"] == by_key[text(r["key"])]["target_image"]


def test_progress_bar_counts_rows_when_forced(tmp_path, capsys, monkeypatch):
    """UNIALIGNMENT_PROGRESS=1 draws the bar on stderr although it is not a terminal here; unset,
    there is none (pytest's stderr is not a terminal); 0 turns it off everywhere."""
    manifest = shapes_tasks.write_official("t2i", "train", 3, str(tmp_path / "src"), resolution=32)
    monkeypatch.setenv(progress.ENV, "1")
    rc, cap = run_prepare(["--manifest", manifest, "--out", str(tmp_path / "a"), "--task", "t2i"], None, capsys)
    assert rc == 0, cap.err
    assert re.search(r"prepare t2i: 100%\|.*\| 3/3 \[[0-9:]+<[0-9:]+, .*row/s, written 3, skipped 0\]", cap.err), cap.err
    monkeypatch.delenv(progress.ENV)
    rc, cap = run_prepare(["--manifest", manifest, "--out", str(tmp_path / "b"), "--task", "t2i"], None, capsys)
    assert rc == 0 and "row/s" not in cap.err, cap.err
    monkeypatch.setenv(progress.ENV, "0")
    assert progress.disable() is True


def test_bad_arguments_exit_2(tmp_path, capsys):
    manifest = shapes_tasks.write_official("t2i", "train", 2, str(tmp_path / "src"), resolution=32)
    assert run_prepare(["--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"), "--task", "t2i"],
                       None, capsys)[0] == 2
    rc, cap = run_prepare(["--manifest", manifest, "--out", str(tmp_path / "o"), "--task", "t2i", "--latents"],
                          None, capsys)
    assert rc == 2 and "--latents" in cap.err
    rc, cap = run_prepare(["--manifest", manifest, "--out", str(tmp_path / "o"), "--task", "t2i", "--teacher",
                           "qwen"], None, capsys)
    assert rc == 2 and "--teacher-path" in cap.err
    assert not os.path.exists(tmp_path / "o")


def test_a_row_that_breaks_the_teacher_is_skipped_alone(tmp_path, capsys, monkeypatch):
    class Fussy:
        name, dim = "fussy", 4

        def encode_images(self, images):
            return np.ones((len(images), 4), np.float16)

        def encode_texts(self, texts):
            if any("circle" in t for t in texts):
                raise RuntimeError("cannot embed circles")
            return np.ones((len(texts), 4), np.float16)

    monkeypatch.setattr(prepare_rows, "_load_teacher", lambda opts: Fussy())
    manifest = shapes_tasks.write_official("t2i", "train", 12, str(tmp_path / "src"), resolution=32)
    circles = {n for n, line in enumerate(open(manifest), 1) if "circle" in json.loads(line)["conversations"][0]["value"]}
    assert 0 < len(circles) < 12
    out = str(tmp_path / "ds")
    rc, cap = run_prepare(["--manifest", manifest, "--out", out, "--task", "t2i", "--teacher", "shapes",
                           "--batch-size", "5"], None, capsys)
    assert rc == 0 and f"rows written: {12 - len(circles)}" in cap.out
    for n in circles:
        assert f":{n}: teacher failed: RuntimeError: cannot embed circles" in cap.out


def test_array_record_compression_option(tmp_path):
    from tensorflow_datasets.core import file_adapters

    from unialignment_jax.data.tfds_builder import array_record_compression

    before = file_adapters.array_record_module
    sizes = {}
    for c in ("uncompressed", "zstd"):
        with array_record_compression(c):
            file_adapters.ArrayRecordFileAdapter.write_examples(str(tmp_path / c), [(i, b"a" * 50_000) for i in range(10)])
        sizes[c] = os.path.getsize(tmp_path / c)
    assert sizes["uncompressed"] > 4 * sizes["zstd"]
    assert file_adapters.array_record_module is before  # TFDS's module is restored
    with pytest.raises(ValueError, match="compression"):
        with array_record_compression("lz4"):
            pass


def test_cli_prepare_with_config_latents_and_strict(tmp_path, repo_root):
    """The real command line: `unialignment prepare --config experiments/demo.py --latents` (the config
    selects the codec and resolution), a bad row reported by line, and --strict's exit code."""
    manifest = shapes_tasks.write_official("edit", "train", 4, str(tmp_path / "src"), resolution=32)
    with open(manifest, "a") as f:
        f.write(json.dumps({"image": ["nope.png", "nope2.png"], "instruction": "x",
                            "conversations": [{"value": "y"}]}) + "\n")
    base = [sys.executable, "-m", "unialignment_jax", "prepare", "--manifest", manifest, "--task", "edit"]
    out = tmp_path / "lat"
    r = subprocess.run(base + ["--config", f"{repo_root}/experiments/demo.py", "--latents", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "rows written: 4" in r.stdout and ":5: missing image" in r.stdout, r.stdout
    builder, spec = open_prepared(str(out))
    assert spec.storage == "latents" and spec.latent_shape == (8, 8, 48) and len(builder.as_data_source("train")) == 4
    strict = tmp_path / "strict"
    r = subprocess.run(base + ["--out", str(strict), "--strict"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and ":5: missing image" in r.stderr and not strict.exists()
    r = subprocess.run(base + ["--out", str(tmp_path / "x"), "--config.batch_size=4"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr  # overrides need --config


def test_latents_through_the_flax_vae(tmp_path, capsys):
    """`prepare --latents` with codec.kind = 'vae' and no weights file (a tiny random SD3-style VAE
    built from config.codec): the stored latents are the Flax VAE's posterior mean, shifted and
    scaled, float16-rounded, of the decoded and resized manifest images (target and condition)."""
    encoders = pytest.importorskip("unialignment_jax.models.encoders")
    import jax.numpy as jnp

    config = small_config(resolution=32)
    config.input.latent_downsample = 2  # two levels: one stride-2 conv
    cd = config.codec
    cd.kind, cd.weights = "vae", ""
    cd.block_out_channels, cd.layers_per_block, cd.norm_num_groups, cd.latent_channels = (8, 16), 1, 4, 4
    config.model.in_channels = config.model.out_channels = 4
    # Sources at 40 px: prepare resizes them to input.resolution (32) before encoding.
    manifest = shapes_tasks.write_official("edit", "train", 4, str(tmp_path / "src"), resolution=40)
    out = str(tmp_path / "vae_lat")
    rc, cap = run_prepare(["--manifest", manifest, "--out", out, "--task", "edit", "--latents"], config, capsys)
    assert rc == 0, cap.err
    assert "rows written: 4" in cap.out
    builder, spec = open_prepared(out)
    assert spec.storage == "latents" and spec.resolution == 32 and spec.latent_dtype == "float16"
    assert spec.latent_shape == (16, 16, 4)  # 32 / 2, latent_channels
    assert spec.codec["kind"] == "vae" and list(spec.codec["block_out_channels"]) == [8, 16]
    src = builder.as_data_source("train")
    assert len(src) == 4

    vae = encoders.build_codec(config)  # the same random init (config.seed)
    assert vae.downsample == 2 and vae.latent_channels == 4
    rows = [json.loads(line) for line in open(manifest)]
    root = os.path.dirname(manifest)

    def pixels(rel):
        img = Image.open(os.path.join(root, rel)).convert("RGB")
        assert img.size == (40, 40)
        return image_lib.normalize(np.asarray(image_lib.resize_center_crop(img, 32)))

    lines = set()
    for i in range(len(src)):
        rec = src[i]
        line = int(text(rec["key"]).split(":")[1])
        lines.add(line)
        cond_path, target_path = rows[line - 1]["image"]
        x = jnp.asarray(np.stack([pixels(target_path), pixels(cond_path)]))
        mean, _ = vae.moments(x)
        want = (np.asarray(mean) - cd.shift_factor) * cd.scaling_factor  # as prepare documents
        np.testing.assert_allclose(np.asarray(vae.encode(x, rng=None)), want, rtol=1e-5, atol=1e-6)
        want16 = want.astype(np.float16).astype(np.float32)
        assert np.abs(want).mean() > 0.05 and want.std() > 0.05  # not a degenerate (constant) encoder
        assert np.abs(want[0] - want[1]).mean() > 0.01  # target and condition differ: a swap would show
        assert rec["target_latents"].dtype == np.float16 and rec["target_latents"].shape == (16, 16, 4)
        assert rec["cond_latents"].dtype == np.float16 and rec["cond_latents"].shape == (1, 16, 16, 4)
        # float16 storage: equal up to one float16 rounding step (jitted batch vs this call).
        np.testing.assert_allclose(rec["target_latents"].astype(np.float32), want16[0], rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(rec["cond_latents"][0].astype(np.float32), want16[1], rtol=2e-3, atol=1e-3)
        assert np.mean(rec["target_latents"].astype(np.float32) == want16[0]) > 0.95
    assert lines == {1, 2, 3, 4}
