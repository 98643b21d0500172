"""Our train step against a PyTorch reference of the same model and objective, side by side.

Like with like: the model-only step, i.e. the DiT forward + backward of both passes (image pass:
flow matching on the noised latent with CFG dropout; text pass: masked text diffusion on the clean
latent) with all five official loss terms (x0 flow loss, MDLM text loss, contrastive, both cosine
alignments), no T5: in both frameworks the "text encoder" is the same kind of fixed random feature
table indexed by token id. PyTorch runs the official model class (`tests/torch_reference.py`, a
diffusers `SD3Transformer2DModel` subclass) and the official loss formulas (`tests/official_losses.py`);
JAX runs `objectives.unified.dual_stream_loss` on our `UniAlignmentDiT` (the trainer's objective).
With --optimizer both steps also update the weights: PyTorch clip + AdamW, JAX the trainer's whole
update (clip, AdamW, EMA, non-finite guard; `step.build_train_step`).

Same config (experiments/bench_medium.py: width 384, 8 blocks, 256 image + 64 text tokens, batch 8,
float32), one CPU device, the same number of threads (the process is pinned to --threads cores and
torch.set_num_threads(--threads); XLA:CPU sizes its pool to the cores it may use). The two steps
alternate (jax, torch, jax, torch, ...) in this one process, so both see the same machine load;
the ratio of the medians is the figure.

FLOP/s: the analytic matmul FLOPs of the two passes (models/flops.py, 3x forward), for both; each
framework's fraction of its own 2048^3 float32 matmul rate measured in this process, sampled after
every round (the median over rounds of step / the peak sampled next to it).

XLA flags must be set before jax is imported: run this script under the flags to measure, e.g.
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
      python benchmarks/torch_reference_step.py
or `--sweep`, which runs this script once per flag preset (subprocesses, in turn) and tabulates them.

Run:  python benchmarks/torch_reference_step.py [--rounds 7] [--threads 2] [--optimizer] [--json]
      python benchmarks/torch_reference_step.py --sweep [--repeats 2] [--presets default,glibc_retain]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

# glibc malloc told to keep what it has (one arena, no mmap'd chunks, no trimming): without it a
# medium step page-faults about 1.8 GB of fresh zeroed pages (460k minor faults per JAX step,
# 300k per PyTorch step), with it none after the warm-up. The value is the CPU launcher's, read
# from launch/_common.sh so the two cannot drift apart.
GLIBC_RETAIN = subprocess.run(["bash", "-c", 'source "$1"; printf %s "$UA_GLIBC_RETAIN"', "_",
                               os.path.join(ROOT, "launch", "_common.sh")],
                              capture_output=True, text=True, check=True).stdout

# Presets compared by --sweep (name -> (XLA_FLAGS, allocator: "system", "jemalloc" or "glibc_retain")).
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
SWEEP = {
    "default": ("", "system"),
    "ynn_off": (YNN_OFF, "system"),
    "jemalloc": ("", "jemalloc"),
    "ynn_off+jemalloc": (YNN_OFF, "jemalloc"),
    "glibc_retain": ("", "glibc_retain"),
    "ynn_off+glibc_retain": (YNN_OFF, "glibc_retain"),
}


def pin_threads(threads: int) -> None:
    """Both frameworks on the same `threads` cores (set before jax / torch start their pools)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > threads:
        os.sched_setaffinity(0, cores[:threads])
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def torch_step_fn(config, *, optimizer: bool, seed: int = 0):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import official_losses as OL
    from torch_reference import reference_from_config

    from unialignment_jax.models.mmdit import DiTConfig

    cfg = DiTConfig.from_config(config.model)
    torch.manual_seed(seed)
    model = reference_from_config(cfg).train()
    b = int(config.batch_size)
    side = int(config.input.resolution) // int(config.input.latent_downsample)
    L = int(config.input.text_length)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(int(config.text_encoder.vocab_size), cfg.context_dim, generator=g)
    null = table[torch.ones(1, L, dtype=torch.long)]
    x0 = torch.randn(b, cfg.in_channels, side, side, generator=g)
    prompt_ids = torch.randint(3, cfg.vocab_size - 1, (b, L), generator=g)
    caption_ids = torch.randint(3, cfg.vocab_size - 1, (b, L), generator=g)
    teacher_img = torch.randn(b, cfg.adapter_out, generator=g)
    teacher_txt = torch.randn(b, cfg.adapter_out, generator=g)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    n_train = sched.config.num_train_timesteps
    opt = None
    if optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=config.optimizer.weight_decay)

    def step():
        model.zero_grad(set_to_none=True)
        # image pass: the official draw (u = sigmoid(N(0,1)) -> scheduler table), CFG dropout
        u = torch.sigmoid(torch.randn(b))
        idx = (u * n_train).long()
        sigmas = sched.sigmas[idx].to(torch.float32)
        timesteps = sched.timesteps[idx].to(torch.float32)
        noise = torch.randn_like(x0)
        prompt = OL.cfg_dropout(table[prompt_ids], null, torch.rand(b))
        out_i = model(OL.flow_noisy_input(x0, noise, sigmas), prompt, timesteps, None, block_depth=cfg.block_depth)
        l_img = OL.flow_loss(out_i["velocity"], x0, noise, sigmas)
        # text pass: antithetic t, masking, clean latent at timestep 0
        t = OL.antithetic_t(torch.rand(b))
        xt = OL.q_xt(caption_ids, t, torch.rand(b, L))
        out_t = model(x0, table[xt], torch.zeros(b), None, block_depth=cfg.block_depth)
        l_txt = OL.text_loss(out_t["text_logits"], caption_ids, xt, t)
        l_con = OL.contrastive(out_i["image_hidden"], out_t["text_hidden"])
        l_ai = OL.cosine_similarity_loss(out_i["tap_image"], teacher_img)
        l_at = OL.cosine_similarity_loss(out_t["tap_text"], teacher_txt)
        total = OL.total_loss(l_img, l_txt, l_con, l_at, l_ai)
        total.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
            opt.step()
        return float(total)

    return step


def torch_matmul_peak(n: int = 2048, steps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def measure(args) -> dict:
    pin_threads(args.threads)
    import jax
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    from unialignment_jax import config as config_lib
    from unialignment_jax.commands import bench
    from unialignment_jax.models import flops
    from unialignment_jax.models.mmdit import DiTConfig
    from unialignment_jax.parallel import mesh as mesh_lib
    from unialignment_jax.parallel import rules as rules_lib
    from unialignment_jax.training.mfu import matmul_peak_flops

    config = config_lib.load(args.config)
    if jax.device_count() != 1:
        raise SystemExit("run on one device (no --xla_force_host_platform_device_count)")
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    t0 = time.perf_counter()
    jax_step = bench.model_only_step(config, mesh, rules, with_optimizer=args.optimizer)
    jax_compile = time.perf_counter() - t0
    torch_step = torch_step_fn(config, optimizer=args.optimizer)
    for _ in range(2):  # warm-up: both allocators reach their steady heap (the second step still faults)
        jax_step()
        torch_step()

    # Minor page faults per step: fresh pages the allocator asked the kernel for (and the kernel
    # zeroed), the cost that jemalloc or GLIBC_RETAIN remove.
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # Each round also samples both matmul peaks: the machine's rate drifts between seconds, so each
    # step is compared with the peak measured next to it (the median of those fractions is reported).
    jax_times, torch_times, jax_faults, torch_faults, xla_peaks, torch_peaks = [], [], [], [], [], []
    for _ in range(args.rounds):
        f0, t0 = faults(), time.perf_counter()
        jax_step()
        jax_times.append(time.perf_counter() - t0)
        f1, t0 = faults(), time.perf_counter()
        torch_step()
        torch_times.append(time.perf_counter() - t0)
        jax_faults.append(f1 - f0)
        torch_faults.append(faults() - f1)
        xla_peaks.append(matmul_peak_flops(steps=3))
        torch_peaks.append(torch_matmul_peak(steps=3))
    xla_peak, torch_peak = statistics.median(xla_peaks), statistics.median(torch_peaks)

    cfg = DiTConfig.from_config(config.model)
    side = config.input.resolution // config.input.latent_downsample // cfg.patch_size
    fwd = flops.dit_forward_flops(cfg, side * side, 0, config.input.text_length)
    step_flops = config.batch_size * 2 * flops.train_pass_flops(fwd)
    tj, tt = statistics.median(jax_times), statistics.median(torch_times)
    return {
        "config": args.config, "threads": args.threads, "optimizer": args.optimizer, "rounds": args.rounds,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "jax_minor_faults_per_step": statistics.median(jax_faults),
        "torch_minor_faults_per_step": statistics.median(torch_faults),
        "jax_step_seconds": tj, "torch_step_seconds": tt, "ratio_jax_to_torch": tj / tt,
        "ratio_per_round_median": statistics.median(a / b for a, b in zip(jax_times, torch_times)),
        "jax_times": jax_times, "torch_times": torch_times, "jax_compile_seconds": jax_compile,
        "step_flops": step_flops,
        "jax_flops_per_sec": step_flops / tj, "torch_flops_per_sec": step_flops / tt,
        "xla_matmul_peak": xla_peak, "torch_matmul_peak": torch_peak,
        "xla_matmul_peaks": xla_peaks, "torch_matmul_peaks": torch_peaks,
        "jax_fraction_of_xla_peak": statistics.median(step_flops / t / p for t, p in zip(jax_times, xla_peaks)),
        "torch_fraction_of_torch_peak": statistics.median(step_flops / t / p
                                                          for t, p in zip(torch_times, torch_peaks)),
    }


def report(r: dict) -> str:
    allocator = " + jemalloc" if r["ld_preload"] else " + glibc retain" if r.get("glibc_tunables") else ""
    return (f"flags [{r['xla_flags'] or 'default'}]{allocator}, {r['threads']} threads"
            f"{', with optimizer' if r['optimizer'] else ''}: JAX {r['jax_step_seconds']:.2f} s, PyTorch "
            f"{r['torch_step_seconds']:.2f} s, ratio {r['ratio_jax_to_torch']:.2f}x; JAX "
            f"{r['jax_flops_per_sec'] / 1e9:.0f} GFLOP/s = {100 * r['jax_fraction_of_xla_peak']:.0f}% of XLA's "
            f"matmul peak ({r['xla_matmul_peak'] / 1e9:.0f}), PyTorch {r['torch_flops_per_sec'] / 1e9:.0f} GFLOP/s = "
            f"{100 * r['torch_fraction_of_torch_peak']:.0f}% of torch's ({r['torch_matmul_peak'] / 1e9:.0f}); "
            f"minor page faults per step: JAX {r['jax_minor_faults_per_step']:.0f}, "
            f"PyTorch {r['torch_minor_faults_per_step']:.0f}")


def sweep(args) -> list[dict]:
    rows = []
    for rep in range(args.repeats):
        for name in args.presets.split(","):
            if name not in SWEEP:
                raise SystemExit(f"--presets: unknown preset {name!r}; choose from {sorted(SWEEP)}")
            flags, allocator = SWEEP[name]
            env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
            env.pop("LD_PRELOAD", None)
            env.pop("GLIBC_TUNABLES", None)
            if allocator == "jemalloc":
                if not os.path.exists(JEMALLOC):
                    print(f"{name:26s} skipped: {JEMALLOC} is not installed", flush=True)
                    continue
                env["LD_PRELOAD"] = JEMALLOC
            elif allocator == "glibc_retain":
                env["GLIBC_TUNABLES"] = GLIBC_RETAIN
            cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--rounds", str(args.rounds),
                   "--threads", str(args.threads), "--json"] + (["--optimizer"] if args.optimizer else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode:
                raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["preset"], r["repeat"] = name, rep
            print(f"{name:26s} " + report(r), flush=True)
            rows.append(r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "experiments", "bench_medium.py"))
    p.add_argument("--rounds", type=int, default=7, help="timed (JAX step, PyTorch step) pairs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimizer", action="store_true", help="time the whole update (clip + AdamW [+ EMA])")
    p.add_argument("--sweep", action="store_true", help="compare the XLA flag presets (one subprocess each)")
    p.add_argument("--repeats", type=int, default=1, help="--sweep: rounds over all presets")
    p.add_argument("--presets", default=",".join(SWEEP), help="--sweep: comma-separated preset names")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.sweep:
        rows = sweep(args)
        if args.json:
            print(json.dumps(rows))
        return 0
    r = measure(args)
    print(json.dumps(r) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
