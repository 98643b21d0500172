"""`evaluate --suite semgen`: generate SemGen-Bench (docs/method.md, "SemGen-Bench") for the official external judge.

Protocol of the official `generate_bench_img.py`:
  * items are the lines of `semgen_bench.jsonl` in order; an item's file name is its 0-based line
    number (`enumerate(file)` in both the generator and the judge `test_bench_score.py`), which is
    `image_id - 1` for the released file;
  * t2i_long, t2i_complex: the prompt, guidance 7.0; edit_multi, edit_complex: the instruction on the
    source image `images/<image_id>.jpg` resized to R x R (PIL `resize`, bicubic, aspect ratio not
    kept), guidance 9.0; 50 Euler steps, the official negative prompt, R = 512 (the run's
    resolution for a model trained at another one);
  * outputs: `<out>/<method>/fullset/<task>/<key>.png`, and for edits the resized source as
    `<key>_SRCIMG.png` (the judge skips an edit item without it). Run the judge with
    `--image_path <out>/<method>`.
Per-item noise comes from (seed, task, key), so a subset (`limit`) reproduces the full run's images.
The data directory and the output root may be URIs (`gs://...`, through etils epath:
unialignment_jax/paths.py); images are encoded in memory and written whole. A progress bar per task
counts images as each compiled sampler call (a batch) finishes (unialignment_jax/progress.py).
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
from etils import epath

from unialignment_jax import paths, progress

T2I_TASKS = ("t2i_long", "t2i_complex")
EDIT_TASKS = ("edit_multi", "edit_complex")
TASKS = T2I_TASKS + EDIT_TASKS
GUIDANCE = {"t2i_long": 7.0, "t2i_complex": 7.0, "edit_multi": 9.0, "edit_complex": 9.0}
OFFICIAL_RESOLUTION = 512


class BenchError(ValueError):
    pass


def read_items(data_dir: str, limit: int = 0) -> list[dict]:
    """The benchmark lines (with `key` = 0-based line number and `image` = the source image's path)."""
    path = paths.join(data_dir, "semgen_bench.jsonl")
    if not paths.is_file(path):
        raise BenchError(f"{path}: not found (SemGen-Bench data directory: --data)")
    items = []
    with paths.open_file(path, "rb") as f:
        for key, line in enumerate(io.TextIOWrapper(f, encoding="utf-8")):
            if limit and len(items) >= limit:
                break
            try:
                item = json.loads(line)
                missing = [k for k in ("image_id",) + TASKS if k not in item]
            except ValueError as e:
                raise BenchError(f"{path} line {key + 1}: not JSON ({e})") from None
            if missing:
                raise BenchError(f"{path} line {key + 1}: missing field(s) {missing}")
            item["key"] = key
            item["image"] = paths.join(data_dir, "images", f"{item['image_id']}.jpg")
            items.append(item)
    return items


def load_source(path: str, resolution: int) -> np.ndarray:
    """The official `Image.open(p).resize((R, R))` (bicubic), as RGB uint8."""
    from PIL import Image

    try:
        with paths.open_file(path, "rb") as f:  # a local path or a URI (gs://...)
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.resize((resolution, resolution), Image.BICUBIC).convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: cannot read the source image ({e})") from None


def generate(run, params, *, out_dir: str, method: str, data_dir: str, limit: int = 0,
             tasks=TASKS, steps: int = 50, guidance: float | None = None, settings=None, batch_size: int = 0,
             log=print) -> dict:
    from unialignment_jax.data.images import write_png
    from unialignment_jax.sampling.pipeline import Settings

    items = read_items(data_dir, limit)
    sampler = run.sampler(batch_size=batch_size)
    res = sampler.resolution
    if res != OFFICIAL_RESOLUTION:
        log(f"semgen: generating at the run's resolution {res} px (the official protocol is {OFFICIAL_RESOLUTION})")
    base = settings or Settings()
    root = paths.join(out_dir, method, "fullset")
    summary = {"out": paths.join(out_dir, method), "items": len(items), "tasks": {}}
    sources = {it["key"]: load_source(it["image"], res) for it in items} if set(tasks) & set(EDIT_TASKS) else {}
    for t, task in enumerate(tasks):
        if task not in TASKS:
            raise BenchError(f"semgen task {task!r}; known: {', '.join(TASKS)}")
        folder = paths.join(root, task)
        epath.Path(folder).mkdir(parents=True, exist_ok=True)
        g = GUIDANCE[task] if guidance is None else guidance
        s = Settings(image_steps=steps, guidance=g, shift=base.shift, negative_prompt=base.negative_prompt,
                     seed=base.seed)
        prompts = [it[task] for it in items]
        indices = [1000 * t + it["key"] for it in items]
        t0 = time.perf_counter()
        with progress.bar(len(items), f"semgen/{task}", unit="image") as bar:
            if task in EDIT_TASKS:
                cond = np.stack([sources[it["key"]] for it in items])[:, None]
                images = sampler.generate(params, "edit", prompts, cond, settings=s, indices=indices,
                                          on_chunk=bar.update)
            else:
                images = sampler.generate(params, "t2i", prompts, None, settings=s, indices=indices,
                                          on_chunk=bar.update)
        seconds = time.perf_counter() - t0
        for it, img in zip(items, images):
            write_png(paths.join(folder, f"{it['key']}.png"), img)
            if task in EDIT_TASKS:
                write_png(paths.join(folder, f"{it['key']}_SRCIMG.png"), sources[it["key"]])
        summary["tasks"][task] = {"images": len(items), "guidance": g, "steps": steps,
                                  "seconds_per_image": seconds / max(len(items), 1)}
        log(f"semgen/{task}: {len(items)} images -> {folder} ({seconds / max(len(items), 1):.2f} s/image)")
    summary["resolution"] = res
    return summary


def table_rows(summary: dict) -> list[list]:
    return [[task, r["images"], r["guidance"], r["steps"], r["seconds_per_image"]]
            for task, r in summary["tasks"].items()]
