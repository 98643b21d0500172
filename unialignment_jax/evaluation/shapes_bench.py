"""`evaluate --suite shapes`: the six tasks on held-out Shapes scenes, scored exactly
(evaluation/shapes_scores.py), our GenEval-like benchmark whose answers are known.

For each task, examples 0 .. limit-1 of the split (default `test`; `data/shapes_tasks.make_example`, the
run's `data.shapes_seed` and `input.num_compose_refs`) are rendered at the run's resolution and
sampled with the official settings unless overridden (images: 50 Euler steps, guidance 7, shift
3; texts: 32 steps). The suite reports, per task, the mean of every score; the headline of each
task is `shapes_scores.PRIMARY` (t2i / compose / caption: attribute accuracy; edit: exact; perception:
map error; vqa: answer accuracy), next to `chance`: the same score of another example's ground
truth (`shapes_scores.chance`), what a model that ignores its input gets. With an output directory
it also writes one PNG grid per image task (rows: condition images, sample, target) and the texts
as JSONL; the directory may be a URI
(`gs://...`, through etils epath: unialignment_jax/paths.py), each file written whole. A progress
bar per task counts examples as each compiled sampler call (a batch) finishes (unialignment_jax/progress.py).
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from unialignment_jax import paths, progress
from unialignment_jax.data import images as image_lib
from unialignment_jax.data import shapes
from unialignment_jax.data import shapes_tasks
from unialignment_jax.data.sources import data_config
from unialignment_jax.evaluation import shapes_scores
from unialignment_jax.tasks import TASKS


def examples(config, task: str, split: str, limit: int) -> list[shapes_tasks.ShapesExample]:
    seed = int(data_config(config)["shapes_seed"])
    return [shapes_tasks.make_example(task, split, i, seed, int(config.input.num_compose_refs)) for i in range(limit)]


def model_inputs(exs, resolution: int):
    """(prompts or questions, condition images (n, K, R, R, 3) or None, images (n, R, R, 3) or None)."""
    task = exs[0].task
    if task in ("caption", "vqa"):
        images = np.stack([shapes.render(e.target, resolution) for e in exs])
        return ([e.question for e in exs] if task == "vqa" else None), None, images
    prompts = [e.caption if task == "t2i" else e.instruction for e in exs]
    if task == "t2i":
        return prompts, None, None
    cond = np.stack([np.stack([shapes.render(c, resolution) for c in e.conds]) for e in exs])
    return prompts, cond, None


def run_task(sampler, params, task: str, exs, settings):
    """(outputs: uint8 images or texts, per-example scores)."""
    res = sampler.resolution
    texts, cond, images = model_inputs(exs, res)
    with progress.bar(len(exs), f"shapes/{task}", unit="ex") as bar:
        if task in ("caption", "vqa"):
            outputs = sampler.describe(params, task, images, texts, settings=settings, on_chunk=bar.update)
        else:
            outputs = list(sampler.generate(params, task, texts, cond, settings=settings, on_chunk=bar.update))
    return outputs, [shapes_scores.score_example(e, o) for e, o in zip(exs, outputs)]


def grid(rows: list[np.ndarray], pad: int = 1) -> np.ndarray:
    """Rows of equally sized uint8 images (each row (n, R, R, 3)) -> one uint8 image."""
    n = max(len(r) for r in rows)
    r = rows[0].shape[1]
    out = np.full((len(rows) * (r + pad) + pad, n * (r + pad) + pad, 3), 64, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (r + pad), pad + j * (r + pad)
            out[y:y + r, x:x + r] = img
    return out


def evaluate(run, params, *, tasks=TASKS, split: str = "test", limit: int = 64, settings=None, batch_size: int = 0,
             out_dir: str | None = None, log=print) -> dict:
    from unialignment_jax.sampling.pipeline import Settings

    settings = settings or Settings()
    sampler = run.sampler(batch_size=batch_size or min(max(limit, 1), 64))
    results = {}
    for task in tasks:
        exs = examples(run.config, task, split, limit)
        outputs, scores = run_task(sampler, params, task, exs, settings)
        key = shapes_scores.PRIMARY[task]
        results[task] = shapes_scores.aggregate(scores)
        results[task]["chance"] = shapes_scores.chance(exs, sampler.resolution)[key]
        log(f"shapes/{task}: {key} = {results[task][key]:.3f} (chance {results[task]['chance']:.3f}, n = {len(exs)})")
        if out_dir:
            epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
            if task in ("caption", "vqa"):
                # A caption's "question" is the run's caption prompt (the given prefix), if any.
                prompt = run.config.input.get("caption_prompt", "")
                lines = [json.dumps({"question": e.question if task == "vqa" else prompt,
                                     "reference": e.caption, "output": o, "scores": s}) + "\n"
                         for e, o, s in zip(exs, outputs, scores)]
                epath.Path(paths.join(out_dir, f"{task}.jsonl")).write_text("".join(lines), encoding="utf-8")
            else:
                k = min(len(exs), 16)
                rows = [np.stack([shapes.render(e.conds[j], sampler.resolution) for e in exs[:k]])
                        for j in range(len(exs[0].conds))]
                rows += [np.stack(outputs[:k]), np.stack([shapes.render(e.target, sampler.resolution)
                                                          for e in exs[:k]])]
                image_lib.write_png(paths.join(out_dir, f"{task}.png"), grid(rows))
    return results


def table_rows(results: dict) -> list[list]:
    rows = []
    for task, r in results.items():
        key = shapes_scores.PRIMARY[task]
        extras = [f"{k}={r[k]:.3f}" for k in ("exact", "object_acc", "relation", "edit_success", "preserved",
                                              "label_acc") if k in r and k != key]
        rows.append([task, key, r[key], r.get("chance", float("nan")), r["n"], " ".join(extras)])
    return rows
