"""`unialignment prepare`: official-format JSONL manifests -> a TFDS dataset of ArrayRecord files.

  unialignment prepare --manifest M.jsonl [--images-root R] --out DIR --task T [--resolution N]
      [--latents] [--teacher qwen|siglip|shapes --teacher-path P] [--strict] [--num-shards K]

Manifest formats (one JSON object per line; docs/method.md "Data manifests",
dataset/data_unify.py of the official code):
  t2i          {"image": [path], "conversations": [{"from": "human", "value": caption},
                                                   {"from": "gpt", "value": "<image>"}]}
               caption = conversations[0].value (also the image-pass prompt, as in the official loop)
  edit,        {"image": [source, target], "conversations": [{"value": caption}, ...], "instruction": text}
  perception   the source is the condition image, the target (edited / perception map) the output;
               caption = conversations[0].value (the text pass captions the target, as officially)
  compose      {"original_images": [K paths], "generated_images": [target], "edit_prompt": text, "caption": text}
               edit_prompt is stripped of ' \\"' as officially
  caption,     ours (LLaVA-style, documented in docs/method.md):
  vqa            {"image": path or [path], "conversations": [{"from": "human", "value": "<image>\\nQ"},
                                                           {"from": "gpt", "value": A}]}
               or {"image": ..., "caption": text} / {"image": ..., "question": Q, "answer": A}.
               caption: the first gpt turn is the caption. vqa: the first human turn without "<image>"
               is the question, the next gpt turn the answer (further turns are ignored).
Relative image paths are joined to --images-root (default: the manifest's directory). Row parsing
and image reading live in data/manifests.py, the per-batch latents, teacher features and row
checks in data/prepare_rows.py; the record layout in data/records.py.

Options: --resolution N (official bicubic short-side resize + centre crop; default keeps the source
bytes untouched), --latents (codec latents through config.codec: the pixel codec or the VAE's
posterior mean), --teacher (float16 teacher features; the text input is the caption, for vqa the
question and the answer), --num-shards K (default: TFDS's size rule, at least --min-shards files),
--workers N (decode in processes), --compression (ArrayRecord chunks; uncompressed by default).
Progress: a bar of rows read (rate; ETA for local manifests, whose rows are counted first) on a
terminal or with UNIALIGNMENT_PROGRESS=1 (unialignment_jax/progress.py); otherwise a log line per
10,000 rows.

Bad rows never crash the run and never lose good rows: each is reported with its manifest line and
reason (malformed JSON, non-UTF-8 text, wrong field types, missing field, empty text, missing image,
unreadable image, corrupt image, image too large, codec failed, invalid record) and skipped; `--strict` makes the
first one fatal (exit 1, nothing written). The dataset is built in `<out>.incomplete-<id>` and
renamed to `<out>` only when complete, so an interrupted run leaves no dataset that looks complete.
Exit codes: 0 written (bad rows skipped), 1 a fatal error (--strict, nothing written), 2 bad arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Sequence

from etils import epath

from unialignment_jax import paths, progress
from unialignment_jax.data.manifests import RowOptions
from unialignment_jax.data.prepare_rows import PrepareError, PrepareOptions, Preparer, PrepareReport
from unialignment_jax.data.records import RecordSpec
from unialignment_jax.tasks import check_task, num_conditions

log = logging.getLogger(__name__)

class UsageError(PrepareError):
    """Bad arguments (exit code 2, nothing written)."""

    exit_code = 2


def options_from_args(args, config=None) -> PrepareOptions:
    """Validate the arguments (UsageError on a bad one) and resolve config defaults."""
    task = check_task(args.task, "--task")
    # Local paths or URIs (gs://...): every path goes through epath (unialignment_jax/paths.py).
    manifests = [paths.absolute(m) for m in args.manifest]
    for m in manifests:
        if not epath.Path(m).is_file():
            raise UsageError(f"--manifest {m}: no such file")
    images_root = paths.absolute(args.images_root) if args.images_root else paths.parent(manifests[0])
    if args.images_root and not epath.Path(images_root).is_dir():
        raise UsageError(f"--images-root {images_root}: no such directory")
    inp = config.input if config is not None else None
    k = args.num_compose_refs or (int(inp.num_compose_refs) if inp is not None else 3)
    num_cond = num_conditions(task, k)
    resolution = args.resolution
    if resolution is None and args.latents and inp is not None:
        resolution = int(inp.resolution)
    if resolution is not None and resolution <= 0:
        raise UsageError(f"--resolution {resolution}: must be positive")
    if args.latents and not resolution:
        raise UsageError("--latents needs a fixed size: give --resolution (or --config for input.resolution)")
    if args.latents and config is None:
        raise UsageError("--latents needs --config (its codec.* section selects the pixel codec or the VAE)")
    if args.keep_images and not args.latents:
        raise UsageError("--keep-images only applies with --latents")
    teacher_dim = 0
    if args.teacher in ("qwen", "siglip") and not args.teacher_path:
        raise UsageError(f"--teacher {args.teacher} needs --teacher-path (a local HF checkpoint directory)")
    if args.teacher == "shapes":
        teacher_dim = args.teacher_dim or (int(config.model.adapter_out) if config is not None else 64)
    if args.num_shards < 0 or args.batch_size <= 0 or args.workers < 0:
        raise UsageError("--num-shards, --workers must be >= 0 and --batch-size > 0")
    out = paths.absolute(args.out)
    out_path = epath.Path(out)
    if out_path.exists() and not args.overwrite and (not out_path.is_dir() or any(out_path.iterdir())):
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    storage = ("both" if args.keep_images else "latents") if args.latents else "encoded"
    row = RowOptions(task=task, num_cond=num_cond, images_root=images_root, resolution=resolution,
                     image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                     max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
                     need_pixels=bool(args.latents or args.teacher), keep_encoded=storage != "latents")
    spec = RecordSpec(task=task, num_cond=num_cond, storage=storage, resolution=resolution or 0,
                      latent_shape=None if not args.latents else (1, 1, 1), latent_dtype=args.latent_dtype,
                      codec=dict(config.codec.to_dict()) if args.latents else None,
                      teacher=args.teacher or "", teacher_dim=teacher_dim or (1 if args.teacher else 0),
                      image_format=args.image_format)
    return PrepareOptions(manifests=manifests, out=out, task=task, split=args.split, row=row, spec=spec,
                          strict=args.strict, num_shards=args.num_shards, min_shards=args.min_shards,
                          batch_size=args.batch_size, workers=args.workers, overwrite=args.overwrite,
                          codec_config=config if args.latents else None, teacher=args.teacher or "",
                          teacher_path=args.teacher_path, teacher_device=args.teacher_device,
                          teacher_dtype=args.teacher_dtype, max_report_lines=args.max_report_lines,
                          compression=args.compression)


def _count_rows(manifests: list[str]) -> int | None:
    """Non-blank lines of the manifests (the bar's total), or None when one is remote (read once only)."""
    if any(paths.is_remote(m) for m in manifests):
        return None
    n = 0
    for m in manifests:
        with open(m, "rb") as f:
            n += sum(1 for raw in f if raw.strip())
    return n


def _download_config(num_shards: int, floor: int):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import shard_utils

    @dataclasses.dataclass(frozen=True)
    class ShardPolicy(shard_utils.ShardConfig):
        """--num-shards K, or TFDS's size rule raised to `floor` files; never more files than rows."""

        requested: int = 0
        floor: int = 8

        def get_number_shards(self, total_size, num_examples, uses_precise_sharding=True):
            n = self.requested or max(self.floor, self.calculate_number_shards(total_size, num_examples,
                                                                              uses_precise_sharding))
            return max(1, min(n, num_examples))

    @dataclasses.dataclass
    class Config(tfds.download.DownloadConfig):
        def get_shard_config(self):
            return ShardPolicy(requested=num_shards, floor=floor)

    return Config()


def prepare(opts: PrepareOptions, report: PrepareReport | None = None) -> PrepareReport:
    """Build the dataset; returns the report (raises PrepareError on a fatal error, after cleanup;
    `report`, when given, is filled as rows are read, so it is complete up to the failure)."""
    import tensorflow_datasets as tfds

    from unialignment_jax.data.tfds_builder import UnialignmentRecords, array_record_compression

    tfds.disable_progress_bar()
    t0 = time.time()
    report = report or PrepareReport(manifests=opts.manifests, task=opts.task, split=opts.split)
    if paths.is_remote(opts.out):
        # A bucket has no atomic rename: build the dataset locally, then upload it with its
        # dataset_info.json last (readers look for that file), replacing an older one (--overwrite).
        with tempfile.TemporaryDirectory(prefix="unialignment-prepare-") as tmp:
            report = prepare(dataclasses.replace(opts, out=os.path.join(tmp, "dataset")), report)
            dst = epath.Path(opts.out)
            if dst.exists():
                dst.rmtree()
            paths.copy_tree(report.out, dst, last=("dataset_info.json",))
        report.out = opts.out
        return report
    out = opts.out
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = f"{out}.incomplete-{uuid.uuid4().hex[:8]}"
    try:
        preparer = Preparer(opts, report)
        extra = {"prepare": {"manifests": opts.manifests, "task": opts.task, "split": opts.split,
                             "resolution": opts.row.resolution, "compression": opts.compression,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}}
        builder = UnialignmentRecords(spec=preparer.spec, split=opts.split, examples=preparer.examples,
                                      extra_metadata=extra, data_dir=tmp, file_format="array_record")
        try:
            chatter = io.StringIO()  # TFDS prints progress lines; keep stdout for the summary
            with contextlib.redirect_stdout(chatter), array_record_compression(opts.compression), \
                    progress.bar(_count_rows(opts.manifests), f"prepare {opts.task}", unit="row") as preparer.bar:
                builder.download_and_prepare(download_config=_download_config(opts.num_shards, opts.min_shards))
            log.info("tfds: %s", chatter.getvalue().strip())
        except AssertionError as e:  # TFDS: "No examples were yielded."
            if report.written == 0:
                raise PrepareError("no good rows: nothing to write") from None
            raise PrepareError(f"TFDS failed: {e}") from e
        version_dir = os.fspath(builder.data_dir)
        files = [f for f in os.listdir(version_dir) if ".array_record-" in f]
        report.num_shards = len(files)
        report.bytes = sum(os.path.getsize(os.path.join(version_dir, f)) for f in files)
        report.out, report.complete = out, True
        report.seconds = time.time() - t0
        with open(os.path.join(version_dir, "prepare_report.json"), "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=1)
        old = None
        if os.path.exists(out):  # --overwrite (checked in options_from_args)
            old = f"{out}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(version_dir, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except PrepareError as e:
        report.error = str(e)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def run(args, config=None) -> int:
    """Entry point of `unialignment prepare` (args from prepare_args.add_arguments)."""
    try:
        opts = options_from_args(args, config)
    except UsageError as e:
        print(f"unialignment prepare: {e}", file=sys.stderr)
        return e.exit_code
    report = PrepareReport(manifests=opts.manifests, task=opts.task, split=opts.split)
    try:
        prepare(opts, report)
    except PrepareError as e:  # the report holds every row read until the failure
        print(report.summary(opts.max_report_lines))
        print(f"unialignment prepare: {e}", file=sys.stderr)
        return e.exit_code
    print(report.summary(opts.max_report_lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m unialignment_jax.data.prepare ...` = `unialignment prepare ...` (one parser)."""
    from unialignment_jax import cli

    return cli.main(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
