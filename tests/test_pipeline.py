"""Grain pipelines: exact resume (get/set_state and Orbax), per-host shards, mixtures, corrupt records
skipped and counted, worker processes, global arrays, the trainer's entry point and the caption prompt."""

import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from unialignment_jax.config import base_config
from unialignment_jax.data import pipeline as P
from unialignment_jax.data.batching import make_iterator
from unialignment_jax.data.decode import example_format
from unialignment_jax.data.sources import (DATA_DEFAULTS, Source, absolute_source_list, data_config, parse_source_list,
                                          prepared_source, shapes_source)
from unialignment_jax.data.records import RecordSpec, new_record
from unialignment_jax.data.tokenizers import build_tokenizer
from unialignment_jax.tasks import TASKS


def small_config():
    c = base_config()
    c.tokenizer.kind = "byte"
    c.input.resolution = 32
    c.input.text_length = 128
    c.model.adapter_out = 16
    c.batch_size = 4
    return c


def _png(colour, size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def t2i_records(n, prefix="row"):
    return [new_record("t2i", key=f"{prefix}:{i}", caption=f"{prefix} {i}", target_image=_png((i % 256, 0, 0)))
            for i in range(n)]


def fmt_for(task="t2i", config=None, spec=None):
    config = config or small_config()
    spec = spec or RecordSpec(task=task)
    return example_format(task, [spec], 8, 16, config.tokenizer)


def captions(batch, tok):
    return tok.decode(batch["caption_ids"])


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("task", ["edit", "vqa"])
def test_resume_mid_epoch_is_exact(task):
    config = small_config()
    it = P.make_train_iterator(config, task, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    expected = [next(it) for _ in range(4)]
    fresh = P.make_train_iterator(config, task, process_index=0, process_count=1)
    fresh.set_state(state)
    for want in expected:
        assert_same(next(fresh), want)


def prepare_dataset(tmp_path, task="t2i", n=10, name="row") -> str:
    """`unialignment prepare` on n rows captioned "{name} {i}"; the dataset's directory (tmp_path/name)."""
    from unialignment_jax.data import prepare, prepare_args

    manifest = str(tmp_path / f"{name}.jsonl")
    with open(manifest, "w") as f:
        for i in range(n):
            path = str(tmp_path / f"{name}{i}.png")
            Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
            turns = [{"from": "human", "value": f"{name} {i}"}, {"from": "gpt", "value": "<image>"}]
            row = {"image": [path], "conversations": turns}
            if task != "t2i":  # edit / perception: [source, target] and an instruction
                row.update(image=[path, path], instruction=f"make {name} {i}")
            f.write(json.dumps(row) + "\n")
    out = str(tmp_path / name)
    args = prepare_args.build_parser().parse_args(["--manifest", manifest, "--out", out, "--task", task])
    assert prepare.run(args) == 0
    return out


def prepared_t2i(tmp_path, n=10):
    return prepared_source(prepare_dataset(tmp_path, "t2i", n, "row"), "train")


def test_resume_through_orbax_and_across_epochs(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    src = prepared_t2i(tmp_path)  # ArrayRecord files written by `prepare`
    fmt = fmt_for()
    it = make_iterator([src], fmt, 3, seed=7)
    for _ in range(5):  # 15 records: mid second epoch
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = [next(it) for _ in range(6)]
    fresh = make_iterator([src], fmt, 3, seed=7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected:
        assert_same(next(fresh), want)
    # every epoch is a new permutation of all records
    tok = build_tokenizer(small_config().tokenizer)
    it = make_iterator([src], fmt, 1, seed=7)
    epochs = [[captions(next(it), tok)[0] for _ in range(10)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(f"row {i}" for i in range(10))
    assert epochs[0] != epochs[1]


def test_two_hosts_see_disjoint_shards_covering_the_data():
    tok = build_tokenizer(small_config().tokenizer)
    src = Source(t2i_records(11), RecordSpec(task="t2i"), name="list")
    seen = []
    for host in range(2):
        it = make_iterator([src], fmt_for(), 1, seed=3, process_index=host, process_count=2)
        n = len(range(host, 11, 2))
        seen.append([captions(next(it), tok)[0] for _ in range(n)])  # one epoch of this host's shard
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"row {i}" for i in range(11)}
    # evaluation: one ordered pass, the same number of batches on every host
    counts = [len(list(make_iterator([src], fmt_for(), 2, shuffle=False, num_epochs=1, process_index=h,
                                        process_count=2))) for h in range(2)]
    assert counts == [2, 2]
    # the config entry point shards the Shapes world the same way
    config = small_config()
    a = next(P.make_train_iterator(config, "t2i", process_index=0, process_count=2))
    b = next(P.make_train_iterator(config, "t2i", process_index=1, process_count=2))
    assert a["target"].shape == (2, 32, 32, 3) and not np.array_equal(a["target"], b["target"])


def test_mixture_follows_the_weights():
    tok = build_tokenizer(small_config().tokenizer)
    a = Source(t2i_records(7, "a"), RecordSpec(task="t2i"), weight=3.0, name="a")
    b = Source(t2i_records(5, "b"), RecordSpec(task="t2i"), weight=1.0, name="b")
    it = make_iterator([a, b], fmt_for(), 8, seed=1)
    names = [c.split()[0] for _ in range(50) for c in captions(next(it), tok)]
    assert names.count("a") == 300 and names.count("b") == 100
    assert parse_source_list("/d/x_{split}:3,shapes, /d/y:0.5") == [("/d/x_{split}", 3.0), ("shapes", 1.0),
                                                                       ("/d/y", 0.5)]


def test_size_weighted_mixture_of_edit_and_perception(tmp_path):
    """`DIR:size,DIR:size` draws each source in proportion to its record count, as a shuffle of
    the concatenation (the official loader's edit + perception dataset); perception records feed
    the edit task."""
    edit = prepare_dataset(tmp_path, "edit", 12, "edit")
    perception = prepare_dataset(tmp_path, "perception", 4, "depth")
    config = small_config()
    config.data.edit = f"{edit}:size,{perception}:size"
    tok = build_tokenizer(config.tokenizer)
    it = P.make_train_iterator(config, "edit", process_index=0, process_count=1, batch_size=8)
    names = [c.split()[0] for _ in range(40) for c in captions(next(it), tok)]
    assert names.count("edit") / len(names) == pytest.approx(12 / 16, abs=0.01)
    # the first 16 examples are one pass over both datasets, each record once
    it = P.make_train_iterator(config, "edit", process_index=0, process_count=1, batch_size=16)
    every_record = [f"edit {i}" for i in range(12)] + [f"depth {i}" for i in range(4)]
    assert sorted(captions(next(it), tok)) == sorted(every_record)
    assert absolute_source_list(config.data.edit) == config.data.edit  # `size` survives the path rewrite
    config.data.edit = f"{edit}:size,{perception}"
    with pytest.raises(ValueError, match="config.data.edit .* weight every source by `size` or none"):
        P.check_data_config(config, ["edit"])
    config.data.edit = f"{edit}:size,{prepare_dataset(tmp_path, 't2i', 2, 'plain')}:size"
    with pytest.raises(ValueError, match="config.data.edit .* records"):  # t2i records cannot feed edit
        P.check_data_config(config, ["edit"])


class FlakySource:
    """A source whose record 4 cannot be read (as a corrupt ArrayRecord chunk)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if i == 4:
            raise OSError("corrupt chunk")
        return self.records[i]


def test_corrupt_records_are_skipped_and_counted():
    recs = t2i_records(12)
    recs[2]["target_image"] = b"\x89PNG garbage"
    recs[7]["caption"] = ""
    recs[9]["target_image"] = _png((1, 2, 3))[:40]
    src = Source(FlakySource(recs), RecordSpec(task="t2i"), name="flaky")
    it = make_iterator([src], fmt_for(), 4, shuffle=False, num_epochs=1, drop_remainder=False)
    batches = list(it)
    assert [len(b["target"]) for b in batches] == [4, 4]  # 12 records - 4 bad
    assert it.skipped_records == 4
    # latents of the wrong shape and missing teacher features are corrupt records too
    spec = RecordSpec(task="t2i", storage="latents", latent_shape=(2, 2, 4), resolution=8, teacher="shapes",
                      teacher_dim=3)
    good = lambda i: new_record("t2i", key=str(i), caption="x", target_latents=np.full((2, 2, 4), i, np.float16),
                                teacher_image=np.ones(3, np.float16), teacher_text=np.ones(3, np.float16))
    recs = [good(i) for i in range(6)]
    recs[1]["target_latents"] = np.zeros((3, 3, 4), np.float16)
    recs[3]["target_latents"] = np.full((2, 2, 4), np.nan, np.float16)
    del recs[5]["teacher_text"]
    fmt = example_format("t2i", [spec], 8, 16, small_config().tokenizer)
    it = make_iterator([Source(recs, spec)], fmt, 3, shuffle=False, num_epochs=1)
    (batch,) = list(it)
    assert it.skipped_records == 3
    assert batch["target_latents"][:, 0, 0, 0].tolist() == [0, 2, 4] and batch["teacher_text"].shape == (3, 3)
    # the count is part of the state
    state = it.get_state()
    fresh = make_iterator([Source(recs, spec)], fmt, 3, shuffle=False, num_epochs=1)
    fresh.set_state(state)
    assert fresh.skipped_records == 3


def test_worker_processes_give_the_same_batches():
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    config = small_config()
    src = shapes_source("compose", "train", 32, 3, 16, 1000)
    fmt = example_format("compose", [src.spec], 32, 128, config.tokenizer)
    inline = make_iterator([src], fmt, 4, seed=5)
    workers = make_iterator([src], fmt, 4, seed=5, worker_count=1)
    for _ in range(3):
        assert_same(next(workers), next(inline))
    state = json.loads(json.dumps(workers.get_state()))
    want = next(inline)
    workers.close()
    with pytest.raises(ValueError, match="worker_count"):
        make_iterator([src], fmt, 4, seed=5).set_state(state)
    fresh = make_iterator([src], fmt, 4, seed=5, worker_count=1)
    fresh.set_state(state)
    assert_same(next(fresh), want)
    fresh.close()


def test_train_iterator_batches_match_the_batch_format():
    config = small_config()
    for task in TASKS:
        batch = next(P.make_train_iterator(config, task, process_index=0, process_count=1))
        want = P.batch_shapes(config, task, teacher_dim=16)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s, np.dtype(d)) for k, (s, d) in want.items()}
        assert batch["target"].min() >= -1 and batch["target"].max() <= 1
        assert (batch["caption_ids"][:, -1] == 1).all()  # EOS padded
    # a stage may change the batch size and the resolution
    batch = next(P.make_train_iterator(config, "edit", process_index=0, process_count=2, batch_size=8,
                                       resolution=48))
    assert batch["cond"].shape == (4, 1, 48, 48, 3)
    # a config without a data section (or with one) selects sources per task
    assert data_config(config)["t2i"] == "shapes"
    with pytest.raises(ValueError, match="divisible"):
        P.make_train_iterator(config, "t2i", process_index=0, process_count=3)


def test_caption_prompt_is_the_caption_tasks_given_prefix():
    """input.caption_prompt goes before caption-task captions (prefix_len = its tokens with EOS);
    the t2i text pass keeps the bare caption (official); "" (the default) gives no prefix."""
    config = small_config()
    tok = build_tokenizer(config.tokenizer)
    plain = next(P.make_train_iterator(config, "caption", process_index=0, process_count=1))
    assert (plain["prefix_len"] == 0).all()
    config.input.caption_prompt = "Describe the image."
    prompt = tok.encode(["Describe the image."], 128)[0]
    n = int(np.flatnonzero(prompt == tok.eos_id)[0]) + 1
    batch = next(P.make_train_iterator(config, "caption", process_index=0, process_count=1))
    assert (batch["prefix_len"] == n).all()
    np.testing.assert_array_equal(batch["caption_ids"][:, :n], np.repeat(prompt[None, :n], 4, 0))
    # the same examples (same seed): the caption follows the prompt (a truncated one still ends in EOS)
    np.testing.assert_array_equal(batch["caption_ids"][:, n:-1], plain["caption_ids"][:, :127 - n])
    assert (batch["caption_ids"][:, -1] == tok.eos_id).all()
    t2i = next(P.make_train_iterator(config, "t2i", process_index=0, process_count=1))
    assert (t2i["prefix_len"] == 0).all()


def test_data_config_is_checked_before_training(tmp_path):
    import ml_collections

    config = small_config()
    P.check_data_config(config, TASKS, splits=("train", "validation"))
    config.data = ml_collections.ConfigDict(dict(DATA_DEFAULTS))
    config.data.edit = str(tmp_path / "missing_{split}") + ":2,shapes"
    with pytest.raises(ValueError, match=r"config.data.edit = .*missing_train"):
        P.check_data_config(config, ["t2i", "edit"])
    config.data.edit = "shapes"
    config.data.worker_count = -1
    with pytest.raises(ValueError, match="config.data.worker_count"):
        P.check_data_config(config, ["t2i"])


def test_to_global_batch_on_the_mesh():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    config = small_config()
    config.batch_size = 8
    host = next(P.make_train_iterator(config, "edit", process_index=0, process_count=1))
    glob = P.to_global_batch(host, mesh)
    assert set(glob) == set(host)
    for k, v in glob.items():
        assert v.shape == host[k].shape and v.dtype == host[k].dtype
        assert v.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(v), host[k])
    assert len(glob["cond"].addressable_shards) == 8 and glob["cond"].addressable_shards[0].data.shape[0] == 1
