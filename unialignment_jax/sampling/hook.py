"""In-training samples: every `config.sample_every` steps the trainer calls the hook made here.

  hook = make_sample_hook(config, frozen, mesh, rules)        # once, after build_frozen
  hook(step, state.params, writer, workdir)                     # every sample_every steps

A hook call renders, from fixed inputs (the same every time, so grids compare across steps):
  * the prompts of `config.sample.prompts` when it is set (a '|'-separated list or a .txt file, one
    prompt per line: sampling/prompts.py), in rows of 8, and captions of the first images;
  * else, Shapes runs (config.data.t2i == 'shapes'): `num_images` t2i prompts and `num_images` edits
    from the Shapes *validation* split, and `num_captions` captions of validation scenes;
  * else fixed prompts (FIXED_PROMPTS) and captions of the images generated from them;
and writes them to TensorBoard (`samples/grid` image, `samples/captions` text through the trainer's
MetricWriter) and to `W/samples/step_<n>.png` (+ `step_<n>.txt` with the prompts and captions). The
grid's rows (Shapes): t2i samples, t2i targets, edit sources, edit samples, edit targets; small
images are enlarged (nearest) to at least 128 px per cell. Image sampling uses `config.sample.steps`
Euler steps and guidance `config.sample.cfg` (defaults: the official 50 and 7; shift 3), texts 32
steps, unless `settings` says otherwise. The first call compiles the samplers (up to three
programs); later calls reuse them.
"""

from __future__ import annotations

import io
import logging
import time

import jax
import numpy as np
from etils import epath
from PIL import Image

from unialignment_jax.data import shapes
from unialignment_jax.data import shapes_tasks
from unialignment_jax.data.sources import data_config
from unialignment_jax.sampling import prompts as prompts_lib
from unialignment_jax.sampling.grids import enlarge, grid, in_rows
from unialignment_jax.sampling.pipeline import Sampler, Settings
from unialignment_jax.sampling.restore import dit_spec

FIXED_PROMPTS = (
    "A red vintage car parked on a cobblestone street at sunset.",
    "A bowl of fresh fruit on a wooden kitchen table, soft morning light.",
    "A snowy mountain peak above a calm blue lake.",
    "A small orange cat sleeping on a green sofa.",
)


def make_sample_hook(config, frozen, mesh, rules, *, num_images: int = 8, num_captions: int = 4,
                     settings: Settings | None = None):
    """hook(step, params, writer, workdir) -> None; `params` is the DiT's pure parameter dict
    (the train state's `params` or `ema`). Only process 0 writes; every process must call it.
    Raises prompts.PromptError for a `config.sample.prompts` file that gives no prompts."""
    settings = settings or Settings(image_steps=int(config.sample.steps), guidance=float(config.sample.cfg))
    chosen = prompts_lib.from_config(config.sample.prompts)  # None: the defaults below
    graphdef, _ = dit_spec(config, mesh, rules)
    sampler = Sampler(config, mesh, rules, frozen, graphdef, batch_size=max(num_images, num_captions))
    res = sampler.resolution
    d = data_config(config)
    use_shapes = chosen is None and d["t2i"] == "shapes"
    seed, k = int(d["shapes_seed"]), int(config.input.num_compose_refs)
    if use_shapes:
        t2i = [shapes_tasks.make_example("t2i", "validation", i, seed, k) for i in range(num_images)]
        edits = [shapes_tasks.make_example("edit", "validation", i, seed, k) for i in range(num_images)]
        caps = [shapes_tasks.make_example("caption", "validation", i, seed, k) for i in range(num_captions)]
        prompts = [e.caption for e in t2i]
        edit_prompts = [e.instruction for e in edits]
        edit_sources = np.stack([shapes.render(e.conds[0], res) for e in edits])[:, None]
        cap_images = np.stack([shapes.render(e.target, res) for e in caps])
        cap_refs = [e.caption for e in caps]
    else:
        prompts = chosen or list(FIXED_PROMPTS[:num_images])

    def hook(step: int, params, writer, workdir) -> None:
        t0 = time.perf_counter()
        samples = sampler.generate(params, "t2i", prompts, settings=settings)
        lines = []
        if use_shapes:
            edited = sampler.generate(params, "edit", edit_prompts, edit_sources, settings=settings)
            captions = sampler.describe(params, "caption", cap_images, settings=settings)
            rows = [samples, np.stack([shapes.render(e.target, res) for e in t2i]), edit_sources[:, 0], edited,
                    np.stack([shapes.render(e.target, res) for e in edits])]
            lines += [f"t2i {i}: {p}" for i, p in enumerate(prompts)]
            lines += [f"edit {i}: {p}" for i, p in enumerate(edit_prompts)]
            lines += [f"caption {i}: {c}  (reference: {r})" for i, (c, r) in enumerate(zip(captions, cap_refs))]
        else:
            n = min(num_captions, len(samples))
            captions = sampler.describe(params, "caption", samples[:n], settings=settings)
            rows = in_rows(samples)
            lines += [f"t2i {i}: {p}" for i, p in enumerate(prompts)]
            lines += [f"caption of t2i {i}: {c}" for i, c in enumerate(captions)]
        image = grid([np.stack([enlarge(x) for x in row]) for row in rows])
        if jax.process_index() == 0:
            writer.write_images(step, {"samples/grid": image})
            writer.write_texts(step, {"samples/captions": "\n\n".join(lines)})
            folder = epath.Path(workdir) / "samples"  # epath: a gs:// workdir works too
            folder.mkdir(parents=True, exist_ok=True)
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            (folder / f"step_{step}.png").write_bytes(png.getvalue())
            (folder / f"step_{step}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        logging.info("samples at step %d in %.1f s", step, time.perf_counter() - t0)

    return hook


__all__ = ["make_sample_hook", "FIXED_PROMPTS"]
