"""`unialignment train` end to end on 8 simulated devices: the run directory (with a profiler
trace), falling loss, Ctrl-C then an exact resume across a stage boundary (logged means over two
steps, W&B offline), resume on another mesh, the non-finite guard, a damaged latest checkpoint, and
configs that cannot run (exit 2, nothing written).

All runs use the same tiny t2i-only step, so the XLA compilation cache (tests/conftest.py) turns
every compile after the first into a cache read.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from unialignment_jax import cli
from tb_events import summary_kinds  # tests/tb_events.py
from unialignment_jax import config as config_lib
from unialignment_jax.models import create
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
from unialignment_jax.parallel import mesh as mesh_lib
from unialignment_jax.parallel import rules as rules_lib
from unialignment_jax.training import checkpoint as checkpoint_lib

TERMS = ("loss/image", "loss/text", "loss/contrastive", "loss/align_image", "loss/align_text")


def base_args(repo_root, workdir, steps=(6, 6, 2), extra=()):
    """The tiny demo, every stage on t2i (one compiled step shared by the three stages)."""
    g, e, u = steps
    return [sys.executable, "-m", "unialignment_jax", "train", "--config", f"{repo_root}/experiments/demo.py:tiny",
            "--workdir", str(workdir), "--cpu_devices", "8",
            f"--config.stages.generation.steps={g}", f"--config.stages.editing.steps={e}",
            f"--config.stages.unified.steps={u}", "--config.stages.editing.tasks=t2i",
            "--config.stages.unified.tasks=t2i", "--config.log_every=1", "--config.checkpoint_every=4",
            "--config.progress=off", "--config.sample_every=0", *extra]


def run(args, timeout=600):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return proc


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def event_tags(workdir):
    """Tags in the TensorBoard event files."""
    return set(summary_kinds(workdir))


@pytest.fixture(scope="module")
def full_run(repo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    proc = run(base_args(repo_root, workdir, extra=["--config.profile=2:3"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_run_directory_and_loss_falls(full_run):
    names = set(os.listdir(full_run))
    assert {"config.json", "checkpoints", "tb", "metrics.jsonl"} <= names
    saved = json.loads((full_run / "config.json").read_text())
    assert saved["model"]["num_layers"] == 2 and list(saved["stages"]) == ["generation", "editing", "unified"]
    rows = metrics(full_run)
    assert [r["step"] for r in rows] == list(range(1, 15))
    for r in rows:
        for key in (*TERMS, "loss", "lr", "grad_norm", "examples_per_sec", "flops_utilization"):
            assert key in r, key
        assert r["finite"] == 1.0
    assert [r["stage"] for r in rows[5:7]] == ["generation", "editing"]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    tags = event_tags(full_run)
    assert set(TERMS) | {"loss", "lr", "grad_norm", "examples_per_sec", "flops_utilization"} <= tags
    steps = sorted(int(p) for p in os.listdir(full_run / "checkpoints") if p.isdigit())
    assert steps == [8, 12, 14]  # saved at 4, 8, 12 and the last step; the last 3 kept
    # config.profile = "2:3": one trace, in the layout TensorBoard's profile plugin reads.
    traces = list((full_run / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces


def interrupt(args, workdir, signum, rows, env=None):
    """Run `args`, send `signum` once metrics.jsonl has `rows` rows, and wait: (exit code, stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 500
    try:
        while time.time() < deadline:
            if (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= rows:
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_ctrl_c_saves_then_resume_is_bit_exact_logging_means(repo_root, tmp_path, full_run):
    """Ctrl-C (SIGINT) once the row of step 2 is logged (inside stage 1): a checkpoint of the last
    step and exit 0; the same command again resumes across the stage boundary to the end. With
    log_every=2 every row, before and after the resume, is exactly the mean of its steps' values in
    the uninterrupted per-step run (the first step is logged alone): a resume that was not
    bit-exact would change them. Process 0 logs the same rows to W&B (offline: no network).
    (SIGTERM goes through the same handler: tests/test_train_logging.py sends both for real, and
    tests/test_multihost.py preempts a two-process run with it.)"""
    workdir = tmp_path / "ctrl_c"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_DIR", None)
    args = base_args(repo_root, workdir, extra=["--config.log_every=2", "--config.wandb.project=unialignment-test",
                                                "--config.wandb.mode=offline"])
    code, err = interrupt(args, workdir, signal.SIGINT, rows=2, env=env)  # once step 2's row is written
    assert code == 0, err[-3000:]
    assert "signal SIGINT after step" in err
    rows = metrics(workdir)
    assert [r["step"] for r in rows[:2]] == [1, 2]
    stopped_at = rows[-1]["step"]
    assert stopped_at < 6, "stopped after the stage boundary: nothing left to check across it"
    assert str(stopped_at) in os.listdir(workdir / "checkpoints")
    run_id = (workdir / "wandb_run_id").read_text().strip()
    (wandb_file,) = (workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert repr(rows[-1]["loss"]).encode() in wandb_file.read_bytes()

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stderr and "resumed" in resumed.stderr
    rows, reference = metrics(workdir), {r["step"]: r for r in metrics(full_run)}
    assert rows[-1]["step"] == 14
    previous = 0
    for r in rows:
        for key in ("loss", *TERMS, "grad_norm", "lr"):
            values = [reference[s][key] for s in range(previous + 1, r["step"] + 1)]
            assert r[key] == sum(values) / len(values), (r["step"], key)
        previous = r["step"]


def _params_at(workdir, step, mesh: dict, rules_name="fsdp"):
    """The DiT parameters saved at `step`, restored onto `mesh` (as numpy)."""
    config = config_lib.load(f"{os.path.dirname(os.path.dirname(__file__))}/experiments/demo.py:tiny")
    mesh_cfg = config_lib.base_config().mesh
    mesh_cfg.update(mesh)
    mesh = mesh_lib.make_mesh(mesh_cfg)
    rules = rules_lib.get_rules(rules_name)
    cfg = DiTConfig.from_config(config.model)
    _, abstract = create.abstract_state(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    params, got, _ = checkpoint_lib.restore_params(workdir / "checkpoints", nnx.to_pure_dict(abstract), step=step)
    assert got == step
    return jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("mesh, rules", [
    (dict(data=1, fsdp=4, tensor=2), "fsdp_tp"),  # another mesh shape, axis and rules preset at once
])
def test_resume_on_another_mesh(repo_root, tmp_path, full_run, mesh, rules):
    """Saved on data=2 x fsdp=4 (the demo's mesh), resumed on another mesh and rules preset."""
    workdir = tmp_path / "resumed"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "8", workdir / "checkpoints" / "8")
    extra = [f"--config.mesh.data={mesh['data']}", f"--config.mesh.fsdp={mesh['fsdp']}",
             f"--config.mesh.tensor={mesh['tensor']}", f"--config.sharding.rules={rules}"]
    proc = run(base_args(repo_root, workdir, extra=extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 8" in proc.stderr
    assert metrics(workdir)[0]["step"] == 9
    # It started from the saved parameters, now laid out on the new mesh ...
    saved = _params_at(full_run, 8, dict(data=2, fsdp=4, tensor=1), "fsdp")
    restored = _params_at(workdir, 8, mesh, rules)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    # ... and trains on from them (not bit-exact across meshes: reduction orders differ). Step 9's
    # loss is computed from the restored parameters alone, so it agrees to float32 round-off.
    ref = {r["step"]: r for r in metrics(full_run)}
    rows = metrics(workdir)
    assert rows[0]["loss"] == pytest.approx(ref[9]["loss"], rel=1e-4)
    for r in rows:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=2e-3)


def test_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(repo_root, tmp_path, full_run):
    workdir = tmp_path / "nonfinite"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "8", workdir / "checkpoints" / "8")
    proc = run(base_args(repo_root, workdir, extra=["--config.stages.editing.lr=1e38",
                                                    "--config.stages.unified.lr=1e38",
                                                    "--config.max_nonfinite_steps=3"]))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 consecutive non-finite steps" in proc.stderr and "step 8" in proc.stderr
    rows = metrics(workdir)
    assert [r["finite"] for r in rows] == [0.0, 0.0, 0.0]
    # Skipped updates never reached the parameters, and the checkpoint still restores them.
    before = _params_at(full_run, 8, dict(data=1, fsdp=8, tensor=1))
    after = _params_at(workdir, 8, dict(data=1, fsdp=8, tensor=1))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_damaged_checkpoint_falls_back_then_all_damaged_stops(repo_root, tmp_path, full_run, capsys):
    """Every file of the latest step (14) truncated: `sample` names it (exit 2, no fallback); train
    resumes from 12 (bit-exact), warns, moves 14 aside and saves 14 again. Then every step damaged:
    exit 1, one line per step, nothing moved."""
    workdir = tmp_path / "damaged"
    shutil.copytree(full_run, workdir)

    def truncate_all(step_dir):
        for root, _, files in os.walk(step_dir):
            for name in files:
                os.truncate(os.path.join(root, name), 0)

    truncate_all(workdir / "checkpoints" / "14")
    assert cli.main(["sample", "--workdir", str(workdir), "--task", "t2i", "--prompt", "a red circle.",
                     "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "step 14 cannot be read" in err and "other steps: 8, 12 (choose one with --step)" in err, err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()
    proc = run(base_args(repo_root, workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 14" in proc.stderr and "cannot be read" in proc.stderr and "at step 12" in proc.stderr
    names = os.listdir(workdir / "checkpoints")
    assert sorted(n for n in names if n.isdigit()) == ["12", "14", "8"]
    assert len([n for n in names if n.startswith("14.damaged-")]) == 1
    reference = {r["step"]: r for r in metrics(full_run)}
    for r in metrics(workdir)[-2:]:  # steps 13 and 14 again, from the restored step 12
        assert r["loss"] == reference[r["step"]]["loss"], r["step"]

    for step in ("8", "12", "14"):
        truncate_all(workdir / "checkpoints" / step)
    before = sorted(os.listdir(workdir / "checkpoints"))
    proc = run(base_args(repo_root, workdir))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "unialignment train: no checkpoint in" in proc.stderr
    for step in ("8", "12", "14"):
        assert f"\n  step {step}: " in proc.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == before


@pytest.mark.parametrize("extra, message", [
    (["--config.batch_size=12"], "batch_size"),
    (["--config.stages.editing.tasks=t2i,paint"], "unknown task 'paint'"),
    (["--config.data.teacher=False"], "no teacher features"),
    (["--config.mesh.data=3"], "cannot fill 8 devices"),
    (["--config.text_encoder.weights=weights/t5"], "text_encoder.mask_embedding = ''"),  # pretrained T5, no row
    (["--config.sample_every=2", "--config.sample.prompts=nowhere/p.txt"], "sample.prompts"),
])
def test_configs_that_cannot_run_exit_2_before_writing(repo_root, tmp_path, extra, message):
    workdir = tmp_path / "bad"
    proc = run(base_args(repo_root, workdir, extra=extra), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not workdir.exists()
