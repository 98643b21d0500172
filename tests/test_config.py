"""Configs: loading with variants and overrides, locking, validation errors naming the key, and the
CLI's exit code 2 before anything is written."""

import os
import subprocess
import sys

import pytest

from unialignment_jax import config as config_lib

DEMO = "experiments/demo.py"


@pytest.fixture(autouse=True)
def _cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def test_loads_variant_and_overrides():
    c = config_lib.load(f"{DEMO}:tiny", ["--config.model.num_heads=2", "--config.stages.generation.steps=7"])
    assert c.model.num_layers == 2 and c.model.num_heads == 2 and c.stages.generation.steps == 7
    with pytest.raises(AttributeError):
        c.new_key = 1  # locked


def test_every_experiment_loads(repo_root):
    for name in sorted(os.listdir(os.path.join(repo_root, "experiments"))):
        if name.endswith(".py") and not name.startswith("_"):
            config_lib.load(f"experiments/{name}")


def test_2b_config_has_the_papers_scale():
    m = config_lib.load("experiments/unialignment_2b.py").model
    assert (m.num_layers, m.num_heads, m.head_dim, m.patch_size, m.in_channels) == (24, 24, 64, 2, 16)
    assert (m.context_dim, m.vocab_size, m.pos_embed_max_size, m.block_depth) == (4096, 32100, 192, 8)
    assert (m.adapter_hidden, m.adapter_out) == (2048, 3584)


def test_stage_order_is_kept():
    c = config_lib.base_config()
    c.stages = config_lib.new_stages()
    for name in ("zeta", "alpha", "mid"):
        c.stages[name] = dict(steps=1, tasks="t2i", warmup_steps=0)
    assert config_lib.stage_names(c) == ["zeta", "alpha", "mid"]


@pytest.mark.parametrize("overrides, message", [
    (["--config.model.nope=1"], "model.nope"),
    (["--config.model.num_layers=abc"], "num_layers"),
    (["--config.model.block_depth=9"], "model.block_depth"),
    (["--config.model.remat=sometimes"], "model.remat"),
    (["--config.model.attention=flash9"], "model.attention"),
    (["--config.model.dtype=float8"], "model.dtype"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one axis"),
    (["--config.mesh.tensor=3"], "mesh.tensor"),
    (["--config.sharding.rules=zero9"], "sharding.rules"),
    (["--config.input.resolution=33"], "input.resolution"),
    (["--config.stages.generation.steps=0"], "stages.generation.steps"),
    (["--config.stages.editing.tasks=t2i,paint"], "unknown task .paint."),
    (["--config.stages.unified.task_weights=1,2"], "task_weights"),
    (["--config.stages.editing.lr_schedule=linear"], "lr_schedule"),
    (["--config.stages.editing.trainable=blocks/(img"], "not a regex"),
    (["--config.stages.editing.accum_steps=3"], "accum_steps"),
    (["--config.optimizer.grad_accum_reduce=max"], "grad_accum_reduce"),
    (["--config.ema.decay=1.0"], "ema.decay"),
    (["--config.sample.steps=0"], "sample.steps"),
    (["--config.sample.cfg=-1.0"], "sample.cfg"),
    (["--config.objective.flow_loss=eps"], "flow_loss"),
    (["--config.text_encoder.preset=t5_giant"], "text_encoder.preset"),
    (["--config.text_encoder.train_mask_embedding=True"], "text_encoder.train_mask_embedding .* not supported"),
    (["--workdir=x"], "unknown argument"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(DEMO, overrides)


def test_bad_variant_and_missing_file():
    with pytest.raises(config_lib.ConfigError, match="unknown variant"):
        config_lib.load(f"{DEMO}:huge")
    with pytest.raises(config_lib.ConfigError, match="cannot load"):
        config_lib.load("experiments/missing.py")


def test_mesh_fit_check():
    c = config_lib.load(DEMO)
    assert config_lib.check_mesh_fits(c, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(config_lib.ConfigError, match="cannot fill 3 devices"):
        config_lib.check_mesh_fits(c, 3)
    c = config_lib.load(DEMO, ["--config.batch_size=12"])
    with pytest.raises(config_lib.ConfigError, match="batch_size"):
        config_lib.check_mesh_fits(c, 8)


def test_cli_exits_2_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "unialignment_jax", "train", "--config", DEMO, "--workdir", str(workdir),
         "--config.model.block_depth=99"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "config.model.block_depth = 99" in proc.stderr
    assert not workdir.exists()
