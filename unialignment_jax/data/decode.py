"""Decoding: a record (data/records.py) -> one example of the batch format (tasks.py): images
decoded, resized and cropped to uint8 pixels, latents and teacher features checked, texts tokenised
(the caption task's optional prompt and VQA's question as a given prefix)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Mapping, Sequence

import numpy as np

from unialignment_jax.data import images as image_lib
from unialignment_jax.data.records import RecordSpec, text
from unialignment_jax.data.sources import Bad, data_config
from unialignment_jax.tasks import IMAGE_PASS_TASKS, record_family

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExampleFormat:
    """What one example of a task looks like in a batch (shared by all sources of a mixture)."""

    task: str
    num_cond: int
    resolution: int
    text_length: int
    latents: bool  # target_latents / cond_latents instead of target / cond pixels
    latent_shape: tuple | None
    teacher_dim: int  # 0: no teacher features
    tokenizer: tuple  # config.tokenizer as sorted (key, value) items (hashable, picklable)
    max_image_pixels: int = image_lib.DEFAULT_MAX_PIXELS
    caption_prompt: str = ""  # input.caption_prompt: the caption task's given question ("" = none)


def example_format(task: str, specs: Sequence[RecordSpec], resolution: int, text_length: int,
                   tokenizer_cfg: Mapping, use_teacher: bool = True, caption_prompt: str = "") -> ExampleFormat:
    """The common format of the sources of one task; raises ValueError on incompatible sources."""
    k = {s.num_cond for s in specs}
    if any(record_family(s.task) != record_family(task) for s in specs) or len(k) != 1:
        raise ValueError(f"task {task}: sources hold {[s.task for s in specs]} records with {sorted(k)} "
                         "condition images")
    latents = {s.has_latents and not s.has_images for s in specs}
    if len(latents) != 1:
        raise ValueError(f"task {task}: mixing sources with latents and sources with images only")
    latents = latents.pop()
    shape = None
    if latents:
        shapes = {tuple(s.latent_shape) for s in specs}
        if len(shapes) != 1:
            raise ValueError(f"task {task}: sources have different latent shapes {sorted(shapes)}")
        shape = shapes.pop()
        bad = [s.resolution for s in specs if s.resolution != resolution]
        if bad:
            raise ValueError(f"task {task}: latents were prepared at {bad[0]} px, the run trains at {resolution} px")
    dims = {s.teacher_dim if s.has_teacher else 0 for s in specs}
    teacher_dim = dims.pop() if (use_teacher and len(dims) == 1) else 0
    if use_teacher and len(dims) > 1:
        log.warning("task %s: not every source has teacher features of one size (%s); batches carry none",
                    task, sorted(dims))
    tok_dict = tokenizer_cfg.to_dict() if hasattr(tokenizer_cfg, "to_dict") else dict(tokenizer_cfg)
    tok = tuple(sorted(tok_dict.items()))
    return ExampleFormat(task, k.pop(), resolution, text_length, latents, shape, teacher_dim, tok,
                         caption_prompt=caption_prompt if task == "caption" else "")


def config_format(config, task: str, sources, resolution: int) -> ExampleFormat:
    """`example_format` of a run's config for `task`'s sources (text length, tokenizer, teacher
    features, caption prompt from the config)."""
    return example_format(task, [s.spec for s in sources], resolution, int(config.input.text_length),
                          config.tokenizer, bool(data_config(config)["teacher"]),
                          caption_prompt=str(config.input.get("caption_prompt", "")))


_TOKENIZERS: dict = {}
_TOKENIZERS_LOCK = threading.Lock()


def _tokenizer(items: tuple):
    """The tokenizer of config.tokenizer `items`, built once per process (workers build their own)."""
    with _TOKENIZERS_LOCK:
        if items not in _TOKENIZERS:
            from unialignment_jax.data.tokenizers import build_tokenizer

            _TOKENIZERS[items] = build_tokenizer(dict(items))
        return _TOKENIZERS[items]


def _num_tokens(tok, ids: np.ndarray) -> int:
    """Tokens up to and including the first EOS (all of them if truncated without one)."""
    eos = np.flatnonzero(ids == tok.eos_id)
    return int(eos[0]) + 1 if eos.size else len(ids)


def tokenize_vqa(tok, question: str, answer: str, length: int) -> tuple[np.ndarray, int]:
    """Question tokens with their EOS (the given prefix), then the answer tokens with EOS, EOS-padded
    to `length`: ((length,) int32 ids, prefix length). When both do not fit, the answer keeps up to
    half the length and the question is truncated (keeping its EOS)."""
    if length < 2:
        raise ValueError(f"text_length {length}: vqa needs room for a question and an answer")
    answer_len = _num_tokens(tok, tok.encode([answer], length)[0])
    q = tok.encode([question], length - min(answer_len, length // 2))[0]
    n = _num_tokens(tok, q)
    a = tok.encode([answer], length - n)[0]
    return np.concatenate([q[:n], a]).astype(np.int32), n


class DecodeExample:
    """record (data/records.py) -> one example of the batch format (tasks.py), or Bad.

    Pixels stay uint8 here (PIXEL_KEYS); `stack_examples` makes the batch's float32 [-1, 1]."""

    def __init__(self, fmt: ExampleFormat):
        self.fmt = fmt

    def _pixels(self, x) -> np.ndarray:
        """uint8 (R, R, 3); converted to float32 [-1, 1] per batch (`stack_examples`), which writes
        each float32 pixel once instead of per example and again when stacking."""
        return image_lib.to_pixels(x, self.fmt.resolution, self.fmt.max_image_pixels)

    def _array(self, x, shape, name) -> np.ndarray:
        a = np.asarray(x)
        if a.shape != tuple(shape):
            raise ValueError(f"{name} of shape {a.shape}, expected {tuple(shape)}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds non-finite values")
        return a

    def __call__(self, rec):
        if isinstance(rec, Bad):
            return rec
        try:
            return self._decode(rec)
        except Exception as e:  # corrupt bytes, wrong shapes, bad text: skip and count
            return Bad(f"{text(rec.get('key', '?')) if isinstance(rec, Mapping) else '?'}: "
                       f"{type(e).__name__}: {e}")

    def _decode(self, rec) -> dict[str, np.ndarray]:
        f, k = self.fmt, self.fmt.num_cond
        out: dict[str, np.ndarray] = {}
        if f.latents:
            out["target_latents"] = self._array(rec["target_latents"], f.latent_shape, "target_latents")
            if k:
                out["cond_latents"] = self._array(rec["cond_latents"], (k, *f.latent_shape), "cond_latents")
        else:
            out["target"] = self._pixels(rec["target_image"])
            if k:
                conds = rec["cond_images"]
                if len(conds) != k:
                    raise ValueError(f"{len(conds)} condition images, expected {k}")
                out["cond"] = np.stack([self._pixels(c) for c in conds])
        tok = _tokenizer(f.tokenizer)
        caption = text(rec["caption"])
        if not caption.strip():
            raise ValueError("empty caption")
        if f.task in IMAGE_PASS_TASKS:
            prompt = caption if f.task == "t2i" else text(rec["instruction"])
            if not prompt.strip():
                raise ValueError("empty instruction")
            out["prompt_ids"] = tok.encode([prompt], f.text_length)[0].astype(np.int32)
        if f.task == "vqa" or f.caption_prompt:  # a given question, then the answer / caption
            question = text(rec["question"]) if f.task == "vqa" else f.caption_prompt
            ids, n = tokenize_vqa(tok, question, caption, f.text_length)
            out["caption_ids"], out["prefix_len"] = ids, np.int32(n)
        else:
            out["caption_ids"] = tok.encode([caption], f.text_length)[0].astype(np.int32)
            out["prefix_len"] = np.int32(0)
        if f.teacher_dim:
            out["teacher_image"] = self._array(rec["teacher_image"], (f.teacher_dim,), "teacher_image")
            out["teacher_text"] = self._array(rec["teacher_text"], (f.teacher_dim,), "teacher_text")
        return out

