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
    # The real train step's arguments, FSDP over 8: float32 params + Adam mu, nu + EMA (16 bytes per
    # DiT parameter) and T5-XXL in bfloat16 (2 bytes), all split 8 ways, plus the replicated SD3 VAE
    # (float32, ~84M) and the batch.
    expected = (16 * 2.124e9 + 2 * 4.76e9) / 8 + 4 * 83.7e6
    assert mem["arguments"] == pytest.approx(expected, rel=0.03)
    assert mem["temporaries"] > 0 and mem["total"] >= mem["arguments"] - mem["aliased"]
    assert set(r["flops_per_step"]) == {"t2i", "edit", "perception", "compose", "caption", "vqa"}
    assert r["flops_per_step"]["compose"] > r["flops_per_step"]["edit"] > r["flops_per_step"]["t2i"]
