"""Damaged checkpoints (training/checkpoint.py) on a train state of a few arrays: `restore_latest`
falls back to the newest step that reads and moves the damaged ones aside (kept, no longer listed, the
step number saved again); with no readable step it names each and moves nothing; `restore_params`
(sample / evaluate / export) names the step it cannot read and does not fall back; two processes
agree when only one of them cannot read its shards. The end-to-end run through `unialignment train`
is in test_train.py."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from etils import epath

from unialignment_jax.training import checkpoint as checkpoint_lib
from unialignment_jax.training.state import TrainState


def tiny_state(step: int) -> TrainState:
    return TrainState(step=jnp.asarray(step), params={"w": jnp.arange(4.0) + step}, opt_state={"mu": jnp.zeros(4)},
                      ema=None, rng=jnp.asarray([0, 1], jnp.uint32), nonfinite=jnp.asarray(0))


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny_state(0))
PARAMS = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}


def truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def halve_array_files(step_dir):
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)  # OCDBT's data files
    assert files
    for path in files:
        truncate(path)


DAMAGE = {
    "array files truncated": halve_array_files,
    "meta emptied": lambda d: truncate(f"{d}/meta/metadata", 0),
    "meta truncated": lambda d: truncate(f"{d}/meta/metadata"),
    "state directory missing": lambda d: shutil.rmtree(f"{d}/state"),
}


def saved(directory, steps=(4, 8)):
    ckpt = checkpoint_lib.Checkpointer(directory, keep_last=5, async_save=False)
    for step in steps:
        ckpt.save(tiny_state(step), {"step": step}, force=True)
    ckpt.close()
    return directory


def snapshot(directory):
    """Every file under `directory` with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_step_falls_back_and_is_moved_aside(tmp_path, caplog, damage):
    directory = saved(tmp_path / "checkpoints")
    DAMAGE[damage](directory / "8")
    damaged_files = snapshot(directory / "8")

    # sample / evaluate / export: no fallback, the step named, the others offered.
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"step 8 cannot be read \(.+\); other steps: 4"):
        checkpoint_lib.restore_params(directory, PARAMS)
    params, step, _ = checkpoint_lib.restore_params(directory, PARAMS, step=4)
    assert step == 4 and params["w"].tolist() == [4, 5, 6, 7]

    ckpt = checkpoint_lib.Checkpointer(directory, keep_last=5, async_save=False)
    with caplog.at_level(logging.WARNING):
        step, state, meta = ckpt.restore_latest(ABSTRACT)
    assert step == 4 and meta == {"step": 4} and state.params["w"].tolist() == [4, 5, 6, 7]
    assert any("step 8" in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)
    aside = [p for p in os.listdir(directory) if p.startswith("8.damaged-")]
    assert len(aside) == 1 and not (directory / "8").exists()
    assert snapshot(directory / aside[0]) == damaged_files  # kept as it was
    assert ckpt.all_steps() == [4]
    ckpt.save(tiny_state(8), {"step": 8}, force=True)  # the same step number saves again
    ckpt.close()
    ckpt = checkpoint_lib.Checkpointer(directory, keep_last=5, async_save=False)
    step, state, _ = ckpt.restore_latest(ABSTRACT)
    assert step == 8 and state.params["w"].tolist() == [8, 9, 10, 11]
    ckpt.close()


def test_no_readable_step_names_each_and_moves_nothing(tmp_path):
    directory = saved(tmp_path / "checkpoints")
    halve_array_files(directory / "8")
    truncate(directory / "4" / "meta" / "metadata", 0)
    before = snapshot(directory)
    ckpt = checkpoint_lib.Checkpointer(directory, keep_last=5, async_save=False)
    with pytest.raises(checkpoint_lib.CheckpointError) as e:
        ckpt.restore_latest(ABSTRACT)
    ckpt.close()
    lines = str(e.value).splitlines()
    assert "no checkpoint in" in lines[0] and "nothing was moved" in lines[0]
    assert lines[1].startswith("  step 8: ValueError") and "OCDBT" in lines[1]
    assert lines[2].startswith("  step 4: JSONDecodeError")
    assert snapshot(directory) == before and sorted(os.listdir(directory)) == ["4", "8"]


def test_no_checkpoint_is_a_fresh_run(tmp_path):
    ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", keep_last=2, async_save=False)
    assert ckpt.restore_latest(ABSTRACT) == (None, None, None)
    ckpt.close()


def test_ema_missing_is_an_error_not_shapes(tmp_path):
    """partial_restore hands back the target's ShapeDtypeStructs for an item the checkpoint lacks."""
    directory = saved(tmp_path / "checkpoints", steps=(4,))
    with pytest.raises(checkpoint_lib.CheckpointError, match="step 4: no EMA weights"):
        checkpoint_lib.restore_params(directory, PARAMS, ema=True)


def test_move_aside_on_a_bucket(bucket):
    """gs:// (in memory): the rename copies each object and deletes the original."""
    directory = epath.Path(f"{bucket}/run/checkpoints")
    for name in ("8/meta/metadata", "8/state/d/abc", "12/meta/metadata"):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(name)
    target = checkpoint_lib.move_aside(directory, 8)
    assert target.name.startswith("8.damaged-")
    assert (target / "state" / "d" / "abc").read_text() == "8/state/d/abc"
    assert sorted(p.name for p in directory.iterdir()) == ["12", target.name]


# Two processes x 2 CPU devices, joined by jax.distributed on localhost; `w` (4096 floats, large enough
# not to be inlined in OCDBT's index) sharded over the 4 devices, so each process reads its own files.
TWO_PROCESSES = r"""
import glob, os, sys
pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.distributed.initialize(f"localhost:{port}", 2, pid)
import jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from unialignment_jax.training import checkpoint as checkpoint_lib
from unialignment_jax.training.state import TrainState

mesh = Mesh(np.array(jax.devices()), ("fsdp",))
split, replicated = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
put = lambda x, sharding: jax.jit(lambda: x, out_shardings=sharding)()
state = lambda s: TrainState(step=put(jnp.asarray(s), replicated), params={"w": put(jnp.arange(4096.0) + s, split)},
                             opt_state={}, ema=None, rng=put(jnp.asarray([0, 1], jnp.uint32), replicated),
                             nonfinite=put(jnp.asarray(0), replicated))
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
ckpt = checkpoint_lib.Checkpointer(root, keep_last=5, async_save=False)
for s in (4, 8):
    ckpt.save(state(s), {"step": s}, force=True)


def damage(pattern):
    ocp.multihost.sync_global_processes("saved")
    if pid == 0:
        for path in glob.glob(f"{root}/{pattern}", recursive=True):
            os.truncate(path, 5)
    ocp.multihost.sync_global_processes("damaged")


damage("8/state/ocdbt.process_1/d/*")  # only process 1 reads these
step, restored, _ = ckpt.restore_latest(abstract)
w = np.asarray(jax.experimental.multihost_utils.process_allgather(restored.params["w"], tiled=True))
print(f"process {pid}: restored {step} {w[[0, 4095]].tolist()} listed {ckpt.all_steps()}", flush=True)
ckpt.save(state(8), {"step": 8}, force=True)
damage("*/state/**/d/*")
try:
    ckpt.restore_latest(abstract)
except checkpoint_lib.CheckpointError as e:
    print(f"process {pid}: {e}", flush=True)
ckpt.close()
"""


def test_two_processes_agree_when_only_one_cannot_read(tmp_path):
    """Process 1 alone fails (its shards' files truncated) while process 0 reads its own: both fall
    back to the same step, process 0 moves the step aside once; then no step reads on any process."""
    from unialignment_jax.cli import simulated_device_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(simulated_device_env(2))
    root = tmp_path / "checkpoints"
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(i), str(port), str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert f"process {i}: restored 4 [4.0, 4099.0] listed [4]" in out, out[-3000:]
        assert f"process {i}: no checkpoint in {root} can be read" in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    assert "step 8 in" in outs[0] and "cannot be read (unreadable on process 1)" in outs[0]
    assert "Requested byte range" in outs[1]
    names = sorted(os.listdir(root))
    assert names[:2] == ["4", "8"] and len(names) == 3 and names[2].startswith("8.damaged-")
