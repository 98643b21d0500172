"""`unialignment bench` on the tiny config: it builds and runs the trainer's real step and reports
what it measured, consistently (no timing is asserted: speed claims come from benchmark runs)."""

from __future__ import annotations

import argparse
import json

import jax
import pytest

from unialignment_jax import config as config_lib
from unialignment_jax.commands import bench
from unialignment_jax.models import flops


@pytest.fixture(scope="module")
def tiny(repo_root):
    return config_lib.load(f"{repo_root}/experiments/demo.py:tiny")


@pytest.mark.slow
def test_bench_reports_the_real_train_step(tiny, capsys):
    args = argparse.Namespace(tasks="caption", steps=1, json=True, compile_compare=False, pixels=False,
                              data_seconds=0.2, sampler_steps=2)
    assert bench.run(args, tiny) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["devices"] == jax.device_count() and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    t = r["tasks"]["caption"]
    # The trainer's step ran: 2 warm-ups + 1 timed step, finite, text pass only (caption).
    assert t["steps_run"] == 3
    m = t["last_step_metrics"]
    assert m["finite"] == 1.0 and "loss/text" in m and "loss/image" not in m
    assert t["flops"] == flops.step_flops(tiny, "caption", tiny.batch_size, tiny.input.resolution)
    assert t["global_batch"] == tiny.batch_size
    assert t["step_seconds"] > 0 and t["compile_seconds"] > 0
    assert t["achieved_flops_per_device"] == pytest.approx(t["flops"] / t["step_seconds"] / jax.device_count())
    # Each timed step is compared with a matmul peak sampled right after it.
    peaks = t["matmul_peak_after_each_step"]
    assert len(peaks) == len(t["step_seconds_all"]) == 1 and peaks[0] > 0
    assert t["ratio_to_matmul_peak"] == pytest.approx(t["flops"] / t["step_seconds"] / jax.device_count() / peaks[0])
    d = t["data_pipeline"]
    assert d["examples_per_sec"] > 0 and d["headroom"] == pytest.approx(d["examples_per_sec"] / d["step_examples_per_sec"])
    s = r["sampler"]
    assert s["denoising_steps"] == 2 and s["loop_seconds"] > 0 and s["forward_seconds"] > 0


def test_bench_stage_picks_a_stage_that_trains_the_task(tiny):
    assert bench.bench_stage(tiny, "t2i").name == "generation"
    assert bench.bench_stage(tiny, "compose").name == "unified"
    assert bench.bench_stage(tiny, "compose").tasks == ("compose",)
