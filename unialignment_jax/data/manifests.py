"""Manifest rows -> validated texts and images (the per-row half of `unialignment prepare`).

`process_line(opts, key, line, raw)` turns one JSONL line into a `Row` (texts; encoded bytes and/or
pixels of [condition images..., target]) or a bad-row tuple (line, reason, detail); it never raises,
so a row can never crash preparation. It runs inline or in worker processes (everything here is
picklable). The manifest formats are described in data/prepare.py.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath

from unialignment_jax import paths
from unialignment_jax.data import images as image_lib


class BadRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------ row parsing


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow("wrong field types", f"{name} is {type(value).__name__}, expected text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("non-UTF-8 text", f"{name} holds unpaired surrogates") from None
    if not value.strip():
        raise BadRow("empty text", name)
    return value


def _get(obj: dict, name: str):
    if name not in obj:
        raise BadRow("missing field", name)
    return obj[name]


def _paths(value, name: str, exactly: int | None = None, at_least: int = 1) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRow("wrong field types", f"{name} must be a path or a list of paths")
    if exactly is not None and len(value) != exactly:
        raise BadRow("wrong field types", f"{name} has {len(value)} paths, expected {exactly}")
    if len(value) < at_least:
        raise BadRow("wrong field types", f"{name} has {len(value)} paths, expected at least {at_least}")
    if any(not p.strip() for p in value):
        raise BadRow("wrong field types", f"{name} holds an empty path")
    return value


def _turns(obj: dict) -> list[dict]:
    conv = _get(obj, "conversations")
    if not isinstance(conv, list) or not conv or not all(isinstance(t, dict) for t in conv):
        raise BadRow("wrong field types", "conversations must be a non-empty list of objects")
    return conv


def _turn_value(turn: dict, where: str) -> str:
    return _text(_get(turn, "value") if "value" in turn else _get(turn, f"{where}.value"), f"{where}.value")


def _qa_turns(conv: list[dict]) -> tuple[dict | None, dict]:
    """(first human turn, the first gpt turn after it) of a LLaVA-style conversation."""
    roles = [str(t.get("from", "")).lower() for t in conv]
    h = next((i for i, r in enumerate(roles) if r in ("human", "user")), None)
    start = 0 if h is None else h + 1
    g = next((i for i in range(start, len(conv)) if roles[i] in ("gpt", "assistant")), None)
    if g is None:
        raise BadRow("missing field", "conversations has no gpt turn")
    return (conv[h] if h is not None else None), conv[g]


def parse_row(task: str, obj: Any, num_cond: int) -> tuple[dict[str, str], list[str]]:
    """(texts, image paths [conditions..., target]) of one manifest row, or raise BadRow."""
    if not isinstance(obj, dict):
        raise BadRow("wrong field types", f"row is a JSON {type(obj).__name__}, expected an object")
    texts = dict(caption="", instruction="", question="")
    if task == "t2i":
        target = _paths(_get(obj, "image"), "image")[0]
        texts["caption"] = _turn_value(_turns(obj)[0], "conversations[0]")
        return texts, [target]
    if task in ("edit", "perception"):
        src, target = _paths(_get(obj, "image"), "image", at_least=2)[:2]
        texts["caption"] = _turn_value(_turns(obj)[0], "conversations[0]")
        texts["instruction"] = _text(_get(obj, "instruction"), "instruction")
        return texts, [src, target]
    if task == "compose":
        refs = _paths(_get(obj, "original_images"), "original_images", exactly=num_cond)
        target = _paths(_get(obj, "generated_images"), "generated_images")[0]
        texts["instruction"] = _text(_text(_get(obj, "edit_prompt"), "edit_prompt").strip(' \\"'), "edit_prompt")
        texts["caption"] = _text(_get(obj, "caption"), "caption")
        return texts, [*refs, target]
    target = _paths(_get(obj, "image"), "image")[0]
    if task == "caption":
        if "caption" in obj:
            texts["caption"] = _text(obj["caption"], "caption")
        else:
            _, gpt = _qa_turns(_turns(obj))
            texts["caption"] = _text(gpt.get("value"), "conversations gpt value")
        return texts, [target]
    if task == "vqa":
        if "question" in obj or "answer" in obj:
            question, answer = _get(obj, "question"), _get(obj, "answer")
        else:
            human, gpt = _qa_turns(_turns(obj))
            if human is None:
                raise BadRow("missing field", "conversations has no human turn (the question)")
            question, answer = human.get("value"), gpt.get("value")
        question = _text(question, "question")
        texts["question"] = _text(question.replace("<image>", "").strip(), "question")
        texts["caption"] = _text(answer, "answer")
        return texts, [target]
    raise ValueError(task)


# ------------------------------------------------------------------------------ row processing


@dataclasses.dataclass(frozen=True)
class RowOptions:
    """What a (possibly remote) worker needs to turn a manifest line into a Row. Picklable."""

    task: str
    num_cond: int
    images_root: str
    resolution: int | None
    image_format: str  # auto | png | jpeg
    jpeg_quality: int
    max_image_pixels: int
    max_image_bytes: int
    need_pixels: bool  # latents or teacher features: keep the decoded pixels
    keep_encoded: bool  # store encoded bytes


@dataclasses.dataclass
class Row:
    line: int
    key: str
    texts: dict
    encoded: list  # [conds..., target] encoded bytes (or None)
    pixels: list  # [conds..., target] uint8 arrays (or None)


def _read_image(path: str, opts: RowOptions) -> tuple[bytes | None, np.ndarray | None]:
    if "://" in path and not path.startswith(("gs://", "s3://")):
        raise BadRow("unreadable image", f"{path}: URLs are not fetched (bucket paths gs://, s3:// are)")
    full = paths.join(opts.images_root, path)  # images_root may be a URI (gs://...)
    try:
        size = epath.Path(full).stat().length
        if size > opts.max_image_bytes:
            raise BadRow("image too large", f"{full}: {size} bytes > {opts.max_image_bytes}")
        with epath.Path(full).open("rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadRow("missing image", full) from None
    except OSError as e:
        raise BadRow("unreadable image", f"{full}: {e.strerror or e}") from None
    try:
        img = image_lib.open_image(data, opts.max_image_pixels)
    except image_lib.ImageError as e:
        raise BadRow(e.reason, f"{full}: {e.detail}") from None
    src_fmt = image_lib.source_format(data)
    if opts.resolution:
        img = image_lib.resize_center_crop(img, opts.resolution)
    encoded = None
    if opts.keep_encoded:
        if not opts.resolution and opts.image_format in ("auto", src_fmt) and src_fmt:
            encoded = data  # untouched source bytes
        else:
            fmt = (src_fmt or "png") if opts.image_format == "auto" else opts.image_format
            encoded = image_lib.encode_image(img, fmt, opts.jpeg_quality)
    pixels = np.asarray(img, dtype=np.uint8) if opts.need_pixels else None
    return encoded, pixels


def process_line(opts: RowOptions, key: str, line: int, raw: bytes):
    """('ok', Row) or ('bad', line, reason, detail) for one manifest line. Never raises."""
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow("non-UTF-8 text", f"byte {e.start}: {e.reason}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRow("malformed JSON", e.msg + f" (column {e.colno})") from None
        texts, paths = parse_row(opts.task, obj, opts.num_cond)
        encoded, pixels = [], []
        for p in paths:
            e, px = _read_image(p, opts)
            encoded.append(e)
            pixels.append(px)
        return "ok", Row(line, key, texts, encoded, pixels)
    except BadRow as e:
        return "bad", line, e.reason, e.detail
    except Exception as e:  # a row must never crash the run
        return "bad", line, "unexpected error", f"{type(e).__name__}: {e}"


def process_star(args):
    """process_line(*args) (for executor.map)."""
    return process_line(*args)
