"""The command line: `inspect` from abstract shapes and an AOT compile of the 2B model on 8
simulated devices, and `--help` for every command."""

import json
import subprocess
import sys

import pytest

from unialignment_jax import cli


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "unialignment_jax", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_inspect_2b_counts_and_aot_memory(repo_root):
    out = run_cli("inspect", "--config", f"{repo_root}/experiments/unialignment_2b.py", "--cpu_devices", "8",
                  "--compile", "--batch", "8", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["params_total"] == pytest.approx(2.124e9, rel=1e-3)
    assert r["params_inference"] == pytest.approx(2.103e9, rel=1e-3)
    assert r["params_by_module"]["blocks"] == pytest.approx(2.0395e9, rel=1e-4)
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    mem = r["memory_per_device_bytes"]
    # FSDP over 8: each device holds 1/8 of the float32 parameters (+ their gradients as outputs).
    assert 0.9 * 4 * 2.124e9 / 8 < mem["arguments"] < 1.3 * 4 * 2.124e9 / 8
    assert mem["temporaries"] > 0 and mem["total"] >= mem["arguments"]
    assert set(r["flops_per_step"]) == {"t2i", "edit", "perception", "compose", "caption", "vqa"}
    assert r["flops_per_step"]["compose"] > r["flops_per_step"]["edit"] > r["flops_per_step"]["t2i"]
