"""Input-pipeline throughput for the 2B recipe's record shapes at 512 px, against what a train step eats.

Writes two small prepared datasets per task (t2i, edit) with the shapes of the 2B recipe
(docs/method.md, "Architecture" and "Training recipe"): 512 x 512 JPEG images (real photographs: the
SemGen-Bench COCO images, centre-cropped and re-encoded at quality 95, as `prepare --resolution 512`
does), or 64 x 64 x 16 float16 VAE latents;
SemGen-Bench-length captions and instructions; 3584-d float16 teacher features. Then it runs the Grain
pipeline (ArrayRecord read, decode, resize check, normalize, byte-level tokenization to 256, batching
at the official per-host batch of 48) and reports examples/s per host.

The consumption side: examples/s one accelerator host's train step consumes, from the analytic FLOPs
(models/flops.py: the DiT image pass + text pass, trained, plus two frozen T5-XXL forwards per example;
the on-device VAE encode of the JPEG path is not counted, so that estimate is conservative) at
`--peak-tflops` x `--mfu` per chip and `--chips-per-host` chips; or a measured `--step-examples-per-sec`
(from `unialignment bench --json` on the training hardware). Headroom = pipeline / step.

Run:  python benchmarks/data_pipeline.py [--threads 8] [--workers 0] [--seconds 8] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unialignment_jax.config import base_config  # noqa: E402
from unialignment_jax.data import images as image_lib  # noqa: E402
from unialignment_jax.data.batching import make_iterator  # noqa: E402
from unialignment_jax.data.decode import example_format  # noqa: E402
from unialignment_jax.data.sources import prepared_source  # noqa: E402
from unialignment_jax.data.records import RecordSpec, new_record  # noqa: E402
from unialignment_jax.data.tfds_builder import UnialignmentRecords, array_record_compression  # noqa: E402

SEMGEN = os.path.join(ROOT, "tests", "data", "semgen_bench")  # 8 real photographs and their prompts
RES, LATENT, TEACHER_DIM, TEXT_LENGTH = 512, (64, 64, 16), 3584, 256
COMPRESSION = "uncompressed"  # prepare's default (--compression)


def photos(n: int) -> list[bytes]:
    """n JPEGs of 512 x 512 (the SemGen-Bench photos the tests ship, repeated)."""
    from PIL import Image

    out = []
    files = sorted(os.listdir(os.path.join(SEMGEN, "images"))) if os.path.isdir(SEMGEN) else []
    rng = np.random.default_rng(0)
    for i in range(n):
        if files:
            img = Image.open(os.path.join(SEMGEN, "images", files[i % len(files)])).convert("RGB")
        else:
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        img = image_lib.resize_center_crop(img, RES)
        out.append(image_lib.encode_image(img, "jpeg", 95))
    return out


def texts(n: int) -> list[tuple[str, str]]:
    rows = []
    path = os.path.join(SEMGEN, "semgen_bench.jsonl")
    if os.path.exists(path):
        rows = [json.loads(line) for line in open(path)]
    out = []
    for i in range(n):
        if rows:
            r = rows[i % len(rows)]
            out.append((r["t2i_long"], r["edit_complex"]))
        else:
            out.append(("a detailed caption of a busy street " * 15, "remove the building on the left"))
    return out


def write_dataset(root: str, task: str, storage: str, n: int, jpegs: list[bytes]) -> str:
    k = 1 if task == "edit" else 0
    spec = RecordSpec(task=task, num_cond=k, storage=storage, resolution=RES,
                      latent_shape=LATENT if storage == "latents" else None, teacher="qwen", teacher_dim=TEACHER_DIM)
    rng = np.random.default_rng(1)
    caps = texts(n)

    def examples():
        for i in range(n):
            caption, instruction = caps[i]
            arrays = dict(teacher_image=rng.standard_normal(TEACHER_DIM).astype(np.float16),
                          teacher_text=rng.standard_normal(TEACHER_DIM).astype(np.float16))
            if storage == "latents":
                arrays["target_latents"] = rng.standard_normal(LATENT).astype(np.float16)
                if k:
                    arrays["cond_latents"] = rng.standard_normal((k, *LATENT)).astype(np.float16)
            else:
                arrays["target_image"] = jpegs[i % len(jpegs)]
                if k:
                    arrays["cond_images"] = [jpegs[(i + 7) % len(jpegs)]]
            yield f"row:{i}", new_record(task, key=f"row:{i}", caption=caption,
                                         instruction=instruction if task != "t2i" else "", **arrays)

    import contextlib

    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    data_dir = os.path.join(root, f"{task}_{storage}")
    b = UnialignmentRecords(spec=spec, split="train", examples=examples, data_dir=data_dir, file_format="array_record")
    with contextlib.redirect_stdout(io.StringIO()), array_record_compression(COMPRESSION):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=8))
    return os.fspath(b.data_dir)


def measure(path: str, task: str, batch: int, threads: int, workers: int, seconds: float) -> dict:
    config = base_config()
    config.tokenizer.kind = "byte"
    src = prepared_source(path, "train")
    fmt = example_format(task, [src.spec], RES, TEXT_LENGTH, config.tokenizer)
    it = make_iterator([src], fmt, batch, seed=0, read_threads=threads, prefetch=4 * batch, worker_count=workers)
    next(it)  # warm-up: threads / workers started, first batch decoded
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += len(b["caption_ids"])
    dt = time.perf_counter() - t0
    if workers:
        it.close()
    return {"examples_per_sec": n / dt, "batches": n // batch, "seconds": dt,
            "batch_bytes": int(sum(v.nbytes for v in b.values()))}


def step_examples_per_sec(task: str, peak_tflops: float, mfu: float, chips: int) -> tuple[float, float]:
    """(examples/s per host, train FLOPs per example) of the 2B recipe from the analytic FLOPs."""
    from unialignment_jax.models import flops
    from unialignment_jax.models.mmdit import DiTConfig

    c = base_config()
    cfg = DiTConfig.from_config(c.model)
    n = (RES // 8 // 2) ** 2
    n_cond = n if task == "edit" else 0
    te = c.text_encoder
    image_pass = flops.train_pass_flops(flops.dit_forward_flops(cfg, n, n_cond, TEXT_LENGTH))
    text_pass = flops.train_pass_flops(flops.dit_forward_flops(cfg, n, 0, TEXT_LENGTH))
    t5 = 2 * flops.t5_forward_flops(te.d_model, te.num_layers, te.num_heads, te.d_kv, te.d_ff, TEXT_LENGTH)
    per_example = image_pass + text_pass + t5
    return chips * peak_tflops * 1e12 * mfu / per_example, per_example


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=144, help="records per dataset")
    p.add_argument("--batch", type=int, default=48, help="per-host batch (official: 48 per GPU)")
    p.add_argument("--threads", type=int, default=max(2, os.cpu_count() or 2), help="read/decode threads")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes")
    p.add_argument("--seconds", type=float, default=8.0, help="measurement time per case")
    p.add_argument("--tasks", default="t2i,edit")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-chip dense bf16 peak (H100/H200: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilization of the train step")
    p.add_argument("--chips-per-host", type=int, default=8)
    p.add_argument("--step-examples-per-sec", type=float, default=0.0,
                   help="measured per-host step consumption (overrides the FLOPs estimate)")
    p.add_argument("--compression", default="uncompressed", choices=("uncompressed", "zstd", "snappy"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    global COMPRESSION
    COMPRESSION = args.compression
    if args.workers:
        from absl import flags

        flags.FLAGS.mark_as_parsed()

    results = {"cpu_count": os.cpu_count(), "threads": args.threads, "workers": args.workers, "batch": args.batch,
               "cases": []}
    with tempfile.TemporaryDirectory() as root:
        jpegs = photos(min(args.rows, 150))
        results["jpeg_kib_mean"] = round(float(np.mean([len(j) for j in jpegs])) / 1024, 1)
        for task in args.tasks.split(","):
            step, fl = step_examples_per_sec(task, args.peak_tflops, args.mfu, args.chips_per_host)
            if args.step_examples_per_sec:
                step = args.step_examples_per_sec
            for storage in ("encoded", "latents"):
                path = write_dataset(root, task, storage, args.rows, jpegs)
                r = measure(path, task, args.batch, args.threads, args.workers, args.seconds)
                r.update(task=task, storage="jpeg" if storage == "encoded" else "latents",
                         step_examples_per_sec=round(step, 1), train_tflop_per_example=round(fl / 1e12, 2),
                         headroom=round(r["examples_per_sec"] / step, 2),
                         examples_per_sec_per_core=round(r["examples_per_sec"] / (os.cpu_count() or 1), 1))
                r["examples_per_sec"] = round(r["examples_per_sec"], 1)
                r["cores_for_3x_headroom"] = round(3 * step / r["examples_per_sec_per_core"], 1)
                results["cases"].append(r)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"data pipeline, 2B recipe shapes at {RES} px, per-host batch {args.batch}, "
              f"{args.threads} threads, {args.workers} workers, {os.cpu_count()} CPUs "
              f"(mean JPEG {results['jpeg_kib_mean']} KiB)")
        for r in results["cases"]:
            print(f"  {r['task']:5s} {r['storage']:8s} {r['examples_per_sec']:8.1f} ex/s  "
                  f"({r['examples_per_sec_per_core']:.1f} per core)   step consumes {r['step_examples_per_sec']:.1f} ex/s "
                  f"per host ({r['train_tflop_per_example']} TFLOP/ex)   headroom {r['headroom']:.2f}x   "
                  f"cores for 3x: {r['cores_for_3x_headroom']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
