"""`unialignment evaluate --workdir W --suite shapes|semgen|val_loss [--out DIR] [--json] [--ema]
[--limit N]`: one evaluation suite on a trained run's latest (or `--step`, or `--ema`) weights.

  val_loss  training losses at fixed sigmas / t on the validation split (evaluation/val_loss.py)
  shapes    the six tasks on held-out Shapes scenes, exact scores (evaluation/shapes_bench.py)
  semgen    SemGen-Bench images for the official judge (evaluation/semgen.py), into
            `--out` (default W/results) / `--method` (default: the workdir's name) / fullset/<task>/

Prints a table; with `--json`, stdout is one JSON object (the table goes to stderr). The scores
are also written to `<out>/results.json` for val_loss and shapes (default out: W/eval/<suite>).
--workdir, --out and --data may be URIs (`gs://...`, through etils epath: unialignment_jax/paths.py).
Exit codes: 0 done, 2 bad input (run, checkpoint, data), 1 a failure while evaluating.
"""

from __future__ import annotations

import json
import logging
import math
import sys

from etils import epath

from unialignment_jax import paths
from unialignment_jax.sampling.restore import RunError, open_run, read_config

SUITES = ("val_loss", "shapes", "semgen")


def format_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def val_loss_tasks(cfg, tasks: list[str]) -> list[str]:
    """The tasks to evaluate: those asked for (each must have validation data), or every task whose
    configured sources have a validation split."""
    from unialignment_jax import tasks as tasks_lib
    from unialignment_jax.data import pipeline

    if tasks:
        pipeline.check_data_config(cfg, tasks, splits=("validation",))
        return tasks
    ok = []
    for task in tasks_lib.TASKS:
        try:
            pipeline.check_data_config(cfg, [task], splits=("validation",))
            ok.append(task)
        except (ValueError, OSError) as e:
            logging.warning("val_loss: skipping %s (%s)", task, e)
    if not ok:
        raise RunError("val_loss: no task has validation data (config.data.<task> sources need a 'validation' split)")
    return ok


def run(args, config=None) -> int:
    del config
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every restore step (and read-only notes)
    from unialignment_jax import tasks as tasks_lib

    try:
        cfg = read_config(args.workdir)
        if args.limit is not None and args.limit < 0:
            raise RunError(f"--limit {args.limit}: must be >= 0")
        if args.temperature < 0:
            raise RunError(f"--temperature {args.temperature}: must be >= 0")
        tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        if args.suite == "semgen":
            from unialignment_jax.evaluation import semgen

            bad = [t for t in tasks if t not in semgen.TASKS]
            if not args.data:
                raise RunError("--suite semgen needs --data DIR: the SemGen-Bench folder (semgen_bench.jsonl and "
                               "images/), SemGen-Bench/benchmark/ in the official UniAlignment repository")
            semgen.read_items(args.data, 1)
        else:
            bad = [t for t in tasks if t not in tasks_lib.TASKS]
        if bad:
            raise RunError(f"--tasks: unknown task {bad[0]!r}")
        if args.suite == "val_loss":
            tasks = val_loss_tasks(cfg, tasks)
        run_ = open_run(args.workdir, ema=args.ema, step=args.step)
    except (RunError, ValueError, OSError) as e:
        print(f"unialignment evaluate: {e}", file=sys.stderr)
        return 2

    import jax

    from unialignment_jax.sampling.pipeline import Settings

    log = lambda msg: logging.info("%s", msg)
    settings = Settings(image_steps=args.steps or 50, guidance=7.0 if args.cfg is None else args.cfg,
                        shift=args.shift, text_steps=args.text_steps or 32, seed=args.seed,
                        text_order=args.text_order, text_temperature=args.temperature)
    suffix = ("_ema" if args.ema else "") + f"_step{run_.step}"
    result = {"suite": args.suite, "workdir": args.workdir, "step": run_.step, "ema": bool(args.ema)}
    if args.suite == "val_loss":
        from unialignment_jax.evaluation import val_loss

        scores = val_loss.evaluate(run_, run_.params, tasks, limit=args.limit or 256,
                                   batch_size=args.batch, seed=args.seed)
        result["scores"] = scores
        table = format_table(["task", "image_loss", "text_loss", "text_loss_other_image", "n"],
                             val_loss.table_rows(scores))
        out_dir = args.out or paths.join(args.workdir, "eval", "val_loss" + suffix)
    elif args.suite == "shapes":
        from unialignment_jax.evaluation import shapes_bench

        if any(cfg.data[t] != "shapes" for t in (tasks or tasks_lib.TASKS)):
            logging.warning("evaluate: the run was not trained on the Shapes world; its scores are still exact")
        out_dir = args.out or paths.join(args.workdir, "eval", "shapes" + suffix)
        scores = shapes_bench.evaluate(run_, run_.params, tasks=tasks or tasks_lib.TASKS, split=args.split,
                                       limit=args.limit or 64, settings=settings, batch_size=args.batch,
                                       out_dir=out_dir if jax.process_index() == 0 else None, log=log)
        result["settings"] = {"image_steps": settings.image_steps, "guidance": settings.guidance,
                              "shift": settings.shift, "text_steps": settings.text_steps,
                              "text_order": settings.text_order, "text_temperature": settings.text_temperature,
                              "split": args.split, "seed": settings.seed}
        result["scores"] = scores
        table = format_table(["task", "metric", "score", "chance", "n", "also"], shapes_bench.table_rows(scores))
    else:
        from unialignment_jax.evaluation import semgen

        out_root = args.out or paths.join(args.workdir, "results")
        method = args.method or (epath.Path(paths.absolute(args.workdir)).name + ("_ema" if args.ema else ""))
        try:
            summary = semgen.generate(run_, run_.params, out_dir=out_root, method=method, data_dir=args.data,
                                      limit=args.limit or 0, tasks=tasks or semgen.TASKS, steps=args.steps or 50,
                                      guidance=args.cfg, settings=settings, batch_size=args.batch, log=log)
        except semgen.BenchError as e:
            print(f"unialignment evaluate: {e}", file=sys.stderr)
            return 2
        result.update(summary)
        table = format_table(["task", "images", "guidance", "steps", "s/image"], semgen.table_rows(summary))
        out_dir = None
    if out_dir and jax.process_index() == 0:
        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
        epath.Path(paths.join(out_dir, "results.json")).write_text(json.dumps(result, indent=2), encoding="utf-8")
        result["out"] = out_dir
    if jax.process_index() == 0:
        header = f"{args.suite} @ step {run_.step}{' (EMA)' if args.ema else ''}: {args.workdir}"
        print(header + "\n" + table, file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps(result))
    return 0
