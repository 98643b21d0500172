"""Multi-host training without the hardware: two processes on this machine joined by
`jax.distributed.initialize` on localhost (CPU, 2 simulated devices each, gloo cross-process
collectives), one global mesh (fsdp over the 4 devices), per-process data shards, an Orbax
checkpoint written by both processes and restored by both; their losses equal one process with 4
devices on the same global batch.

The single-process reference reads the same global batch: its data iterator is the two processes'
shards (process 0's rows, then process 1's: the order `make_array_from_process_local_data` lays
them out on the mesh), through a small shim around `pipeline.make_train_iterator`.

Runs (tiny config, every step t2i, so each run compiles one step; 10 steps):
  reference  1 process x 4 devices, all steps uninterrupted
  phase 1    2 processes x 2 devices; SIGTERM to process 1 alone after step 3 is logged: both stop
             after the same step k (jax.distributed's preemption sync point), save it, exit 0
  phase 2    the same 2 processes resume from step k (state + per-process data positions) to the end
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from unialignment_jax.cli import simulated_device_env

TIMEOUT = 240  # seconds per run; a hung collective fails the test instead of the suite

COMMON = [
    "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1",
    "--config.stages.editing.tasks=t2i", "--config.stages.unified.tasks=t2i",
    "--config.stages.generation.steps=2", "--config.stages.editing.steps=1",
    "--config.log_every=1", "--config.checkpoint_every=2", "--config.progress=off",
]
SCHEDULE = ["--config.stages.unified.steps=7"]  # 2 + 1 + 7 steps
STEPS = 10

# The single-process reference: every data iterator yields the concatenation of the 2 process
# shards' host batches, i.e. the global batch the 2-process run assembles.
REFERENCE_SHIM = r"""
import sys
import numpy as np
from unialignment_jax.data import pipeline

_make = pipeline.make_train_iterator
N = 2


class Shards:
    def __init__(self, its):
        self.its, self.skipped_records = its, 0

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"shards": [it.get_state() for it in self.its]}

    def set_state(self, state):
        for it, s in zip(self.its, state["shards"]):
            it.set_state(s)


def make(config, task, split="train", process_index=None, process_count=None, **kw):
    return Shards([_make(config, task, split, i, N, **kw) for i in range(N)])


pipeline.make_train_iterator = make
from unialignment_jax import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, n_devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(simulated_device_env(n_devices))
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla_cache")  # phase 2 reuses phase 1's compile
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _report(name, logs) -> str:
    return "\n".join(f"----- {name} {i} (last 3000 chars) -----\n{text[-3000:]}" for i, text in enumerate(logs))


def _train_two_processes(repo_root, tmp_path, workdir, overrides, name, sigterm_after=0):
    """Both processes to the end; with `sigterm_after`, SIGTERM to process 1 once that many steps
    are in W/metrics.jsonl."""
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        log = open(tmp_path / f"{name}_{i}.log", "w")
        cmd = [sys.executable, "-m", "unialignment_jax", "train", "--config", f"{repo_root}/experiments/demo.py:tiny",
               "--workdir", str(workdir), *COMMON, *overrides,
               f"--config.distributed.coordinator_address=localhost:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path, 2), cwd=repo_root))
        log.close()
    failed = None
    try:
        deadline = time.time() + TIMEOUT
        while sigterm_after and time.time() < deadline and all(p.poll() is None for p in procs):
            if (workdir / "metrics.jsonl").exists() and len(_losses(workdir)) >= sigterm_after:
                procs[1].send_signal(signal.SIGTERM)
                break
            time.sleep(0.1)
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                failed = f"{name}: process {i} did not finish in {TIMEOUT} s (a hung collective?)"
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"{name}_{i}.log").read_text() for i in range(2)]
    if failed is None and any(p.returncode for p in procs):
        failed = f"{name}: exit codes {[p.returncode for p in procs]}"
    if failed:
        pytest.fail(failed + "\n" + _report(name, logs))
    return logs


def _losses(workdir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.mark.slow
def test_two_processes_equal_one_process_preempt_and_resume(repo_root, tmp_path):
    # Reference: one process, 4 simulated devices, all STEPS steps uninterrupted.
    ref_dir = tmp_path / "reference"
    cmd = [sys.executable, "-c", REFERENCE_SHIM, "train", "--config", f"{repo_root}/experiments/demo.py:tiny",
           "--workdir", str(ref_dir), *COMMON, *SCHEDULE]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(tmp_path, 4), cwd=repo_root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # Phase 1: two processes; once a few steps are logged, process 1 alone gets SIGTERM (a host
    # preempted). jax.distributed's preemption sync point makes both save the same step k and exit 0.
    run_dir = tmp_path / "two_processes"
    logs = _train_two_processes(repo_root, tmp_path, run_dir, SCHEDULE, "phase1", sigterm_after=3)
    assert "jax.distributed: process 1 of 2" in logs[1], _report("phase1", logs)
    for i, text in enumerate(logs):  # every log line after jax.distributed's start names its process
        assert any(line.startswith(f"[p{i}] ") and "saving and exiting" in line for line in text.splitlines())
    stopped = [int(line.split("after step ")[1].split(":")[0]) for text in logs for line in text.splitlines()
               if "saving and exiting" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1], _report("phase1", logs)
    k = stopped[0]
    assert 3 <= k < STEPS, f"stopped at {k}: the preemption came too late to test" + _report("phase1", logs)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == k, saved
    meta = json.loads((run_dir / "checkpoints" / str(k) / "meta" / "metadata").read_text())
    assert meta["data"]["process_count"] == 2 and len(meta["data"]["per_process"]) == 2  # both data positions

    # Phase 2: the same two processes resume from step k to the end.
    logs = _train_two_processes(repo_root, tmp_path, run_dir, SCHEDULE, "phase2")
    assert all(f"at step {k}" in text and "resumed" in text for text in logs), _report("phase2", logs)
    assert "data: unified/t2i restored" in logs[0] and "data: unified/t2i restored" in logs[1], _report("phase2", logs)
    multi = _losses(run_dir)  # process 0 wrote steps 1-k in phase 1 and the rest in phase 2
    assert sorted(multi) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "loss/image", "loss/text", "grad_norm"):
            np.testing.assert_allclose(multi[step][key], reference[step][key], rtol=2e-5, atol=1e-6,
                                       err_msg=f"step {step} {key}")
