"""`unialignment sample`: one task from a trained run (the command-line contract, README.md).

  unialignment sample --workdir W --task t2i --prompt "a large red circle at the center." --out a.png
  unialignment sample --workdir W --task t2i --prompts prompts.txt --out grid.png [--batch N]
  unialignment sample --workdir W --task edit --prompt "Make the circle blue." --image src.png --out b.png
  unialignment sample --workdir W --task compose --prompt "Place image 1 at the left, ..." \
      --image r1.png --image r2.png --image r3.png --out c.png
  unialignment sample --workdir W --task caption --image a.png --out a.txt
  unialignment sample --workdir W --task vqa --prompt "What colour is the circle?" --image a.png --out q.txt

Reads W/config.json and restores the latest checkpoint's parameters (`--step N` for another,
`--ema` for the EMA weights) onto this host's devices. Images are written as PNG; texts are printed
and written to --out. Input images are resized (short side, bicubic) and centre-cropped to the
run's resolution, as the official pipeline does. Defaults are the official settings: 50 steps and
guidance 7 (SD3 timestep shift 3) for images, 32 steps for texts; except that texts unmask their
most confident positions first (`--text_order random`: the official ddpm_cache order; a caption
follows the run's `input.caption_prompt` when it has one).

`--prompts FILE` (t2i): one prompt per line; --out is one PNG grid of their images at the run's
resolution, in rows of 8 in the file's order, sampled in batches of `--batch` (default data x fsdp)
through the same compiled sampler. Progress: a bar over the images as each compiled sampler call (a
batch) finishes, then a log line with the time; not over steps: a sampler's steps are one jitted
`lax` loop, which reports nothing until it ends.

--workdir, --image and --out may be URIs (`gs://...`, through etils epath: unialignment_jax/paths.py);
the output is encoded in memory and written whole (a bucket object cannot be written in place).

Exit codes: 0 done; 2 bad input (no run / config / checkpoint, wrong number of images for the
task, an unreadable image, a missing prompt), with a message naming it; 1 a failure while sampling.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
from etils import epath

from unialignment_jax import paths, progress
from unialignment_jax import tasks as tasks_lib
from unialignment_jax.sampling.prompts import PromptError, read_prompt_file
from unialignment_jax.sampling.restore import RunError, open_run, read_config

TEXT_TASKS = ("caption", "vqa")


class InputError(ValueError):
    pass


def load_image(path: str, resolution: int) -> np.ndarray:
    """uint8 (R, R, 3): the official ImageProcessor (RGB, short-side bicubic resize, centre crop)."""
    from unialignment_jax.data import images as image_lib

    try:
        with paths.open_file(path, "rb") as f:  # a local path or a URI (gs://...)
            data = f.read()
    except OSError as e:
        raise InputError(f"--image {path}: cannot read ({e.strerror or e})") from None
    try:
        return image_lib.to_pixels(data, resolution)
    except image_lib.ImageError as e:
        raise InputError(f"--image {path}: {e}") from None


def check_inputs(task: str, prompt: str | None, images: list[str], num_compose_refs: int) -> None:
    """The task's prompt and image count; raises InputError."""
    tasks_lib.check_task(task)
    if task in TEXT_TASKS:
        want = 1
        if task == "vqa" and not (prompt or "").strip():
            raise InputError("--task vqa needs the question as --prompt")
        if task == "caption" and prompt:
            raise InputError("--task caption takes no --prompt (its question, if any, is the run's "
                             "input.caption_prompt; ask other questions with --task vqa)")
    else:
        want = tasks_lib.num_conditions(task, num_compose_refs)
        if not (prompt or "").strip():
            raise InputError(f"--task {task} needs --prompt (the {'prompt' if task == 't2i' else 'instruction'})")
    if len(images) != want:
        what = {0: "no --image", 1: "exactly one --image"}.get(want, f"exactly {want} --image (one per reference)")
        raise InputError(f"--task {task} takes {what}; got {len(images)}")


def run(args, config=None) -> int:
    del config
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every restore step (and read-only notes)
    images = list(args.image or [])
    prompts = None  # --prompts: the file's lines
    try:
        cfg = read_config(args.workdir)
        if args.prompts is not None:
            if args.task != "t2i" or args.prompt is not None or images:
                raise InputError("--prompts (a file of prompts, one grid) is for --task t2i, without --prompt / --image")
            prompts = read_prompt_file(args.prompts, f"--prompts {args.prompts}")
        else:
            check_inputs(args.task, args.prompt, images, int(cfg.input.num_compose_refs))
        if args.batch < 0:
            raise InputError(f"--batch {args.batch}: must be >= 0 (0: data x fsdp)")
        if args.steps is not None and args.steps < 1:
            raise InputError(f"--steps {args.steps}: must be at least 1")
        if args.temperature < 0:
            raise InputError(f"--temperature {args.temperature}: must be >= 0")
        if args.cfg < 0:
            raise InputError(f"--cfg {args.cfg}: the guidance scale must be >= 0 (<= 1: no guidance)")
        if args.shift <= 0:
            raise InputError(f"--shift {args.shift}: must be positive")
        pixels = [load_image(p, int(cfg.input.resolution)) for p in images]
        out_dir = paths.parent(paths.absolute(args.out))
        if paths.is_dir(args.out):
            raise InputError(f"--out {args.out} is a directory; give a file path")
        run_ = open_run(args.workdir, ema=args.ema, step=args.step)
    except (RunError, InputError, PromptError) as e:
        print(f"unialignment sample: {e}", file=sys.stderr)
        return 2

    import jax

    from unialignment_jax.data import images as image_lib
    from unialignment_jax.sampling.grids import grid, in_rows
    from unialignment_jax.sampling.image import NEGATIVE_PROMPT
    from unialignment_jax.sampling.pipeline import Settings

    negative = NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    settings = Settings(image_steps=args.steps or 50, guidance=args.cfg, shift=args.shift,
                        negative_prompt=negative, text_steps=args.steps or 32, seed=args.seed,
                        text_order=args.text_order, text_temperature=args.temperature)
    sampler = run_.sampler(batch_size=args.batch)
    logging.info("sample: %s from %s step %d%s", args.task, args.workdir, run_.step, " (EMA)" if args.ema else "")
    writer = jax.process_index() == 0
    if writer:
        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    n = len(prompts or [None])
    t0 = time.perf_counter()
    with progress.bar(n, f"sample {args.task}", unit="ex") as bar:
        if args.task in TEXT_TASKS:
            questions = [args.prompt] if args.task == "vqa" else None
            outputs = sampler.describe(run_.params, args.task, np.stack(pixels), questions, settings=settings,
                                       on_chunk=bar.update)
        else:
            cond = np.stack(pixels)[None] if pixels else None
            outputs = sampler.generate(run_.params, args.task, prompts or [args.prompt], cond, settings=settings,
                                       on_chunk=bar.update)
    logging.info("sample: %d output(s) in %.1f s (sampler calls of %d; the first one compiles)", n,
                 time.perf_counter() - t0, sampler.batch_size)
    if args.task in TEXT_TASKS:
        print(outputs[0])
        if writer:
            epath.Path(args.out).write_text(outputs[0] + "\n", encoding="utf-8")
    elif writer:
        image_lib.write_png(args.out, grid(in_rows(outputs)) if prompts else outputs[0])
        print(f"wrote {args.out}" + (f" ({n} images in rows of 8, in the order of {args.prompts})" if prompts else ""))
    return 0
