"""The medium train step under each remat policy, interleaved in one process: which one the CPU wants.

`model.remat` decides what the scanned blocks keep for the backward pass. On XLA:CPU the matmuls run
near the machine's matmul rate and the rest of a step is memory traffic: with "none" every
intermediate of every layer (norms, modulations, GELU, softmax) is written into the scan's stacked
residual buffers and read back; with "dots" only the matmul outputs are kept and the elementwise
work between them is recomputed, so no matmul runs twice; "dots_except_scores" also recomputes
the attention scores (QK^T), the one matmul output cheaper to recompute than to store. This script
times the model-only step (`bench.model_only_step`: both DiT passes with all five official loss
terms, no T5) of experiments/bench_medium.py for each policy, rounds alternating between the
policies so that all see the same machine load, and the 2048^3 float32 matmul rate in the same
process.

Run under the CPU launcher's preset (XLA flags and the allocator must be set before jax is
imported; `bash launch/local.sh --dry-run ...` prints them): with jemalloc
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
      python benchmarks/remat_step.py [--policies none,dots,dots_except_scores,dots_no_batch,full] [--rounds 5]
without it, GLIBC_TUNABLES=<UA_GLIBC_RETAIN of launch/_common.sh> python benchmarks/remat_step.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "experiments", "bench_medium.py"))
    p.add_argument("--policies", default="none,dots,dots_except_scores,dots_no_batch,full")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    import jax

    from unialignment_jax import config as config_lib
    from unialignment_jax.commands import bench
    from unialignment_jax.models import flops
    from unialignment_jax.models.mmdit import DiTConfig
    from unialignment_jax.parallel import mesh as mesh_lib
    from unialignment_jax.parallel import rules as rules_lib
    from unialignment_jax.training.mfu import matmul_peak_flops

    if jax.device_count() != 1:
        raise SystemExit("run on one device (no --xla_force_host_platform_device_count)")
    policies = [s for s in args.policies.split(",") if s]
    steps, compile_s = {}, {}
    for policy in policies:
        config = config_lib.load(args.config)
        config.model.remat = policy
        config_lib.validate(config)
        mesh, rules = mesh_lib.make_mesh(config.mesh), rules_lib.get_rules(config.sharding.rules)
        t0 = time.perf_counter()
        steps[policy] = bench.model_only_step(config, mesh, rules)
        compile_s[policy] = time.perf_counter() - t0
    times = {policy: [] for policy in policies}
    for _ in range(args.rounds):
        for policy in policies:
            t0 = time.perf_counter()
            steps[policy]()
            times[policy].append(time.perf_counter() - t0)
    peak = matmul_peak_flops()

    cfg = DiTConfig.from_config(config.model)
    side = config.input.resolution // config.input.latent_downsample // cfg.patch_size
    fwd = flops.dit_forward_flops(cfg, side * side, 0, config.input.text_length)
    step_flops = config.batch_size * 2 * flops.train_pass_flops(fwd)  # both passes; remat not counted
    base = statistics.median(times[policies[0]])
    rows = []
    for policy in policies:
        t = statistics.median(times[policy])
        rows.append({"policy": policy, "step_seconds": t, "speedup_vs_first": base / t,
                     "flops_per_sec": step_flops / t, "fraction_of_matmul_peak": step_flops / t / peak,
                     "compile_and_first_step_seconds": compile_s[policy], "times": times[policy]})
    if args.json:
        print(json.dumps({"config": args.config, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                          "ld_preload": os.environ.get("LD_PRELOAD", ""), "matmul_peak": peak,
                          "step_flops": step_flops, "rounds": args.rounds, "policies": rows}))
    else:
        print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; step {step_flops / 1e9:.0f} GFLOP (analytic)")
        for r in rows:
            print(f"  remat {r['policy']:18s} {r['step_seconds']:6.2f} s  {r['speedup_vs_first']:5.2f}x vs "
                  f"{policies[0]}  {r['flops_per_sec'] / 1e9:5.0f} GFLOP/s = "
                  f"{100 * r['fraction_of_matmul_peak']:3.0f}% of the matmul peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
