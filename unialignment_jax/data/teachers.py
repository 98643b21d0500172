"""Frozen teachers for intrinsic alignment (docs/method.md, "Intrinsic alignment"): features of
target images and captions.

Interface (every teacher): `name`, `dim`, and
  encode_images(images: sequence of uint8 (H, W, 3) arrays) -> float16 (B, dim)
  encode_texts(texts: sequence of str) -> float16 (B, dim)
`prepare --teacher ...` stores the outputs per example (records.teacher_image / teacher_text, float16).

Implementations (PyTorch through transformers 5.x, run offline from a local checkpoint directory):
- `QwenVLTeacher` (the official teacher, Qwen2.5-VL-7B-Instruct, 3584-d):
  image: pixels mapped to [0, 1] and passed through the Qwen2-VL image processor with
  `do_rescale=False` (smart resize: 512 -> 504, 14-px patches), then `get_image_features`: the
  vision-merger output tokens (324 x 3584 at 504 px), averaged over tokens.
  text: the tokenizer's ids (no special tokens added, as `processor(text=...)`), looked up in the LLM
  input-embedding table (`get_input_embeddings`, non-contextual), averaged over tokens.
  Deviation, on purpose: the official loop pads the whole local batch and averages over the padded
  length (pad embeddings included), which makes a caption's target depend on its batch-mates. A
  per-example stored feature cannot depend on the batch, so we average over the caption's own
  tokens: the official value for a batch of one.
- `SiglipTeacher` (the adapters' original target per the `#1152` comment: SigLIP-so400m): pooled image
  embedding (`get_image_features`) and pooled text embedding (`get_text_features`, texts padded to
  `max_length` 64 as SigLIP was trained).
- `ShapesTeacher` (data/shapes.py): the exact symbolic teacher of the Shapes world.

No preprocessing is downloaded: `from_pretrained(path)` reads the image processor, tokenizer and
model from the checkpoint directory (separately: the full Qwen2.5-VL processor would also build a
video processor, which needs torchvision). Tests build the model classes from tiny random configs,
construct the image processors directly (`Qwen2VLImageProcessor()`, `SiglipImageProcessor(size=...)`:
no files needed; without torchvision transformers uses their PIL versions) and a small word-level
tokenizer in memory, and also save all three to a directory to exercise `from_pretrained` offline.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Teacher(Protocol):
    name: str
    dim: int

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str):
    import torch

    if name not in _TORCH_DTYPES:
        raise ValueError(f"teacher dtype {name!r}: choose one of {_TORCH_DTYPES}")
    return getattr(torch, name)


def _to_f16(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float16)


def _pooled(out):
    """transformers 5 returns model outputs from get_*_features; older versions a tensor."""
    return out if hasattr(out, "shape") else out.pooler_output


def _load_parts(path: str, dtype: str):
    """(image processor, tokenizer, model) from a local checkpoint directory, offline. The parts are
    loaded one by one: the full Qwen2.5-VL processor also builds a video processor, which needs
    torchvision."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ValueError(f"--teacher-path {path}: cannot load a teacher checkpoint offline ({e})") from None
    return image_processor, tokenizer, model


class QwenVLTeacher:
    """Qwen2.5-VL features: mean merger tokens (images), mean input-token embeddings (texts)."""

    name = "qwen"

    def __init__(self, model, image_processor, tokenizer, device: str = "cpu", batch_size: int = 8):
        self.model = model.eval().to(device)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        cfg = model.config
        self.dim = int(getattr(cfg, "text_config", cfg).hidden_size)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "bfloat16") -> "QwenVLTeacher":
        image_processor, tokenizer, model = _load_parts(path, dtype)
        return cls(model, image_processor, tokenizer, device)

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0
                     for im in images[i:i + self.batch_size]]
            inputs = self.image_processor(images=chunk, return_tensors="pt", do_rescale=False)
            with torch.no_grad():
                feats = self.model.get_image_features(inputs["pixel_values"].to(self.device),
                                                      inputs["image_grid_thw"].to(self.device))
            per_image = _pooled(feats)  # tuple: one (tokens, dim) tensor per image
            out.extend(_to_f16(f.mean(dim=0)) for f in per_image)
        return np.stack(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        table = self.model.get_input_embeddings()
        out = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"the teacher tokenizer gives no tokens for {t!r}")
            with torch.no_grad():
                emb = table(torch.tensor(ids, device=self.device))
            out.append(_to_f16(emb.mean(dim=0)))
        return np.stack(out)


class SiglipTeacher:
    """SigLIP pooled image and text embeddings."""

    name = "siglip"

    def __init__(self, model, image_processor, tokenizer, device: str = "cpu", batch_size: int = 16,
                 text_length: int = 64):
        self.model = model.eval().to(device)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.text_length = text_length
        self.dim = int(model.config.vision_config.hidden_size)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "float32") -> "SiglipTeacher":
        image_processor, tokenizer, model = _load_parts(path, dtype)
        return cls(model, image_processor, tokenizer, device)

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch
        from PIL import Image

        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [Image.fromarray(np.ascontiguousarray(im)) for im in images[i:i + self.batch_size]]
            inputs = self.image_processor(images=chunk, return_tensors="pt")
            with torch.no_grad():
                feats = _pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
            out.append(_to_f16(feats))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.text_length, return_tensors="pt")
            with torch.no_grad():
                feats = _pooled(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device)))
            out.append(_to_f16(feats))
        return np.concatenate(out)


def build_teacher(kind: str, path: str | None = None, dim: int | None = None, device: str = "cpu",
                  dtype: str = "float32", seed: int = 0) -> Teacher:
    """The teacher named `kind` (qwen | siglip from a local checkpoint `path`; shapes with `dim`)."""
    if kind == "qwen":
        return QwenVLTeacher.from_pretrained(path, device=device, dtype=dtype)
    if kind == "siglip":
        return SiglipTeacher.from_pretrained(path, device=device, dtype=dtype)
    if kind == "shapes":
        from unialignment_jax.data.shapes import ShapesTeacher

        teacher = ShapesTeacher(dim or 64, seed)
        teacher.name = "shapes"
        return teacher
    raise ValueError(f"teacher {kind!r}: choose qwen, siglip or shapes")


__all__ = ["Teacher", "QwenVLTeacher", "SiglipTeacher", "build_teacher"]
