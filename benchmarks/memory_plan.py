"""Per-device memory of the real 2B train step, FSDP over 8, 64 and 256 devices, for every remat
policy: what fits on which accelerator.

Method. For each (devices N, remat policy) this runs, in a fresh process,

  unialignment inspect --config experiments/unialignment_2b.py --cpu_devices N --mesh 1,N,1 \
      --compile --batch (2 * M * N) --accum 2 --config.model.remat=POLICY --json

i.e. the exact step `unialignment train` runs (frozen T5-XXL in bfloat16 and the SD3 VAE encoder
inside, both passes of the DiT in bfloat16 compute / float32 parameters, AdamW, EMA, non-finite
guard; 512 px pixels in, t2i task), lowered from abstract inputs onto N simulated CPU devices and
compiled by XLA:CPU, which partitions it with GSPMD exactly as for N accelerators. Nothing is
allocated: the figures are XLA's buffer assignment for one device (`compiled.memory_analysis()`):
  arguments    the device's shard of params, Adam moments, EMA, frozen T5 + VAE, and its batch
  temporaries  activations kept for the backward pass, gathered FSDP weights, gradients, the
               accumulation carry, collective buffers
  outputs      the new state (aliased with the donated arguments: not counted twice)
  total        arguments + outputs + temporaries - aliased
Two micro-batches (--accum 2) of M examples per device are compiled so the gradient-accumulation
carry is included (the recipe accumulates 12; more micro-batches only add their input pixels,
3 MB per example). M defaults to the recipe's per-device micro-batch: batch_size / accum_steps
over 8 devices = 384 / 12 / 8 = 4 (the official per-GPU micro-batch).

Caveat: this is XLA:CPU's buffer assignment of the partitioned program. TPU and GPU compilers fuse
and schedule differently (and may rematerialise on their own under memory pressure), so the
accelerator's own figure can differ by tens of percent; "fits" below means total <= 90% of the
device's memory, to leave room for that, the runtime and fragmentation. Confirm on the hardware
with the same command (without --cpu_devices) before a long run.

Run:  python benchmarks/memory_plan.py [--devices 8,64,256] [--remat none,full,dots,dots_except_scores,dots_no_batch]
          [--per_device_micro_batch 4] [--json OUT.json] [--markdown OUT.md]
(about 15 minutes and 2.5 GB of RAM on 2 cores for the full grid).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "unialignment_2b.py")
GiB = 2**30
# Per-device memory (GB as sold; GiB below). v5e 16 GB, v6e 32 GB, H100 80 GB, v5p 95 GB, H200 141 GB.
DEVICES = (("v5e", 16e9), ("v6e", 32e9), ("H100", 80e9), ("v5p", 95e9), ("H200", 141e9))
FIT_FRACTION = 0.9


def default_micro_batch(config_path: str) -> int:
    sys.path.insert(0, ROOT)
    from unialignment_jax import config as config_lib

    c = config_lib.load(config_path)
    first = c.stages[list(c.stages.keys())[0]]
    return max(1, (first.batch_size or c.batch_size) // first.accum_steps // 8)


def plan_one(n: int, remat: str, micro: int, task: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "unialignment_jax", "inspect", "--config", CONFIG, "--cpu_devices", str(n),
           "--mesh", f"1,{n},1", "--compile", "--task", task, "--batch", str(2 * micro * n), "--accum", "2",
           f"--config.model.remat={remat}", "--json"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mem = r["memory_per_device_bytes"]
    return {"devices": n, "remat": remat, "per_device_micro_batch": micro, "task": task,
            "compile_seconds": r["compile_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
            **{k: mem[k] for k in ("arguments", "temporaries", "outputs", "aliased", "total")}}


def fits(total: int) -> dict[str, bool]:
    return {name: total <= FIT_FRACTION * cap for name, cap in DEVICES}


def markdown(rows: list[dict]) -> str:
    micro = rows[0]["per_device_micro_batch"]
    head = ("| FSDP devices | remat | arguments | temporaries | total | "
            + " | ".join(f"{n} {c / 1e9:.0f} GB" for n, c in DEVICES) + " |")
    lines = [f"Per-device memory of the 2B t2i train step at 512 px, {micro} examples per device per micro-batch "
             "(GiB; XLA:CPU buffer assignment of the GSPMD-partitioned step, see benchmarks/memory_plan.py). "
             f"Fits = total <= {int(FIT_FRACTION * 100)}% of the device's memory.", "", head,
             "|" + "---|" * (5 + len(DEVICES))]
    for r in rows:
        ok = fits(r["total"])
        lines.append(f"| {r['devices']} | {r['remat']} | {r['arguments'] / GiB:.1f} | {r['temporaries'] / GiB:.1f} | "
                     f"{r['total'] / GiB:.1f} | " + " | ".join("yes" if ok[n] else "no" for n, _ in DEVICES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="8,64,256")
    p.add_argument("--remat", default="none,full,dots,dots_except_scores,dots_no_batch")
    p.add_argument("--per_device_micro_batch", type=int, default=0, help="default: from the config (4)")
    p.add_argument("--task", default="t2i")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default="", help="write the rows as JSON here")
    p.add_argument("--markdown", default="", help="write the markdown table here")
    args = p.parse_args(argv)
    micro = args.per_device_micro_batch or default_micro_batch(CONFIG)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        for remat in args.remat.split(","):
            r = plan_one(n, remat, micro, args.task, args.timeout)
            print(f"FSDP {n:4d} remat {remat:14s} arguments {r['arguments'] / GiB:6.2f} temporaries "
                  f"{r['temporaries'] / GiB:7.2f} total {r['total'] / GiB:7.2f} GiB  (compile {r['compile_seconds']} s)",
                  flush=True)
            rows.append(r)
    table = markdown(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
