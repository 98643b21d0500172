"""Command-line arguments of `unialignment prepare` (imports nothing heavy: no jax, no tfds).

The CLI adds these to its `prepare` subparser with `add_arguments(parser)` and calls
`unialignment_jax.data.prepare.run(args, config)`; `config` is the experiment config when the user
gave `--config` (it supplies defaults: input.resolution for --latents, codec.*, input.num_compose_refs,
model.adapter_out for the Shapes teacher) and None otherwise.
"""

from __future__ import annotations

import argparse

TASK_CHOICES = ("t2i", "edit", "perception", "compose", "caption", "vqa")
TEACHER_CHOICES = ("qwen", "siglip", "shapes")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--manifest", required=True, action="append",
                   help="official-format JSONL manifest (repeat the flag to concatenate several of one task)")
    p.add_argument("--images-root", default=None,
                   help="directory that relative image paths are joined to (default: the manifest's directory)")
    p.add_argument("--out", required=True, help="output dataset directory (written atomically)")
    p.add_argument("--task", required=True, choices=TASK_CHOICES,
                   help="t2i / edit / perception (TI2I format), compose, caption / vqa (LLaVA-style format)")
    p.add_argument("--split", default="train", help="split name to write (train, validation, ...)")
    p.add_argument("--resolution", type=int, default=None,
                   help="bicubic short-side resize + centre crop to N x N (official); default: keep images "
                        "as they are (the config's input.resolution with --latents)")
    p.add_argument("--image-format", default="auto", choices=("auto", "png", "jpeg"),
                   help="encoding of re-encoded images (auto: keep the source format, PNG otherwise)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--latents", action="store_true",
                   help="store codec latents (config.codec: pixel codec or VAE) instead of encoded images")
    p.add_argument("--keep-images", action="store_true", help="with --latents, also store the encoded images")
    p.add_argument("--latent-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--teacher", default=None, choices=TEACHER_CHOICES,
                   help="also store frozen-teacher features (float16) of the target image and the caption")
    p.add_argument("--teacher-path", default=None,
                   help="local HF checkpoint directory of the teacher (qwen: Qwen2.5-VL, siglip: SigLIP)")
    p.add_argument("--teacher-dim", type=int, default=None,
                   help="shapes teacher: feature size (default: config model.adapter_out, else 64)")
    p.add_argument("--teacher-device", default="cpu", help="torch device of the teacher (cpu, cuda, cuda:1)")
    p.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", type=int, default=16, help="rows per codec / teacher batch")
    p.add_argument("--num-compose-refs", type=int, default=None,
                   help="compose: reference images per row (default: config input.num_compose_refs, else 3)")
    p.add_argument("--strict", action="store_true", help="any bad row is fatal (exit 1, nothing written)")
    p.add_argument("--num-shards", type=int, default=0,
                   help="ArrayRecord files to write (0: TFDS picks by size, at least --min-shards)")
    p.add_argument("--min-shards", type=int, default=8,
                   help="with --num-shards 0: at least this many files when there are enough rows")
    p.add_argument("--compression", default="uncompressed", choices=("uncompressed", "zstd", "snappy"),
                   help="ArrayRecord chunk compression (images and latents barely compress; zstd reads slower)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="decompression-bomb guard: images with more pixels are bad rows")
    p.add_argument("--max-image-bytes", type=int, default=100 * 2 ** 20, help="image files larger than this are bad rows")
    p.add_argument("--workers", type=int, default=0, help="processes that decode / resize images (0: inline)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--max-report-lines", type=int, default=200, help="bad rows listed in the printed summary")
    return p


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (tests, `python -m unialignment_jax.data.prepare`)."""
    return add_arguments(argparse.ArgumentParser(prog="unialignment prepare",
                                                 description="official JSONL manifest -> ArrayRecord dataset"))


__all__ = ["add_arguments", "build_parser", "TASK_CHOICES", "TEACHER_CHOICES"]
