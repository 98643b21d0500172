"""Task pipelines: prompts / images in, PNG-ready images or texts out, for all six tasks.

`Sampler` wraps the two jitted samplers (sampling/image.py, sampling/text.py) for a run's config,
mesh and frozen encoders:
  * `generate(params, task, prompts, cond_images)`: t2i (no condition), edit / perception (one),
    compose (`input.num_compose_refs`) -> uint8 (n, R, R, 3);
  * `describe(params, task, images, questions)`: caption, vqa -> texts (captions after the run's
    `input.caption_prompt` when it has one, given like a VQA question).
Inputs are split into chunks of `batch_size` examples (a multiple of the data-parallel size
data x fsdp; the last chunk is padded), placed on the mesh with the batch over ('data', 'fsdp'),
and each chunk is one call of a compiled sampler (compiled once per task shape, steps count and
guidance on/off; the guidance scale and seed are arguments). Example i of a call draws its noise
from (seed, indices[i]) (default indices 0..n-1), so results do not depend on `batch_size`.
`on_chunk(n)`, when given, is called after each compiled call with the examples it finished: the
progress bars of `sample` and `evaluate` count those (a sampler's steps are one jitted loop, which
reports nothing until it ends).

Defaults are the official settings (docs/method.md, "Sampling"): 50 image steps, guidance 7 with the official
negative prompt, SD3's timestep shift 3.0; 32 text steps at the configured text length; except the
text sampler's unmasking order: most confident positions first (`text_order = "random"` is the
official ddpm_cache; sampling/text.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from unialignment_jax import tasks as tasks_lib
from unialignment_jax.models import create
from unialignment_jax.sampling import image as image_lib
from unialignment_jax.sampling import schedule
from unialignment_jax.sampling import text as text_lib

IMAGE_TASKS = ("t2i", "edit", "perception", "compose")
TEXT_TASKS = ("caption", "vqa")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sampling settings; the defaults are the official ones."""

    image_steps: int = 50
    guidance: float = 7.0  # SemGen-Bench edits use 9.0
    shift: float = schedule.DEFAULT_SHIFT
    negative_prompt: str = image_lib.NEGATIVE_PROMPT
    text_steps: int = 32
    text_cache: bool = True
    # Unmasking order of the text sampler: "confidence" (ours: most confident positions first) or
    # "random" (official ddpm_cache); sampling/text.py says why. Temperature: confidence order only.
    text_order: str = "confidence"
    text_temperature: float = 0.0
    seed: int = 0


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[-1, 1] float pixels -> uint8 as the official scripts: clamp(x / 2 + 0.5, 0, 1) * 255, truncated."""
    x = np.clip(np.asarray(pixels, np.float32) * 0.5 + 0.5, 0.0, 1.0)
    return (x * 255).astype(np.uint8)


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (ToTensor + Normalize(.5, .5))."""
    return np.asarray(pixels, np.float32) / np.float32(127.5) - np.float32(1.0)


def num_tokens(ids: np.ndarray, eos_id: int) -> int:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    eos = np.flatnonzero(np.asarray(ids) == eos_id)
    return int(eos[0]) + 1 if eos.size else len(ids)


class Sampler:
    def __init__(self, config, mesh, rules, frozen, dit_graphdef, *, batch_size: int = 0,
                 resolution: int = 0):
        """frozen: training/encoders.Frozen (tokenizer, text encoder, codec); dit_graphdef: the DiT's
        graphdef (models/create.abstract_state). batch_size: examples per compiled call (rounded up
        to a multiple of data x fsdp; 0: data x fsdp). resolution: pixels (0: input.resolution)."""
        self.config, self.mesh, self.rules, self.frozen = config, mesh, rules, frozen
        self.graphdef = dit_graphdef
        self.tokenizer = frozen.tokenizer
        self.text_length = int(config.input.text_length)
        self.caption_prompt = str(config.input.get("caption_prompt", ""))
        self.resolution = int(resolution or config.input.resolution)
        f = int(config.input.latent_downsample)
        if self.resolution % (f * int(config.model.patch_size)):
            raise ValueError(f"resolution {self.resolution}: must be a multiple of latent_downsample x patch_size "
                             f"= {f * int(config.model.patch_size)}")
        side = self.resolution // f
        self.latent_shape = (side, side, int(config.model.in_channels))
        self.num_compose_refs = int(config.input.num_compose_refs)
        self.shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
        b = max(int(batch_size), 1)
        self.batch_size = -(-b // self.shards) * self.shards
        self._compiled: dict = {}
        self.replicated = NamedSharding(mesh, PartitionSpec())

    # ------------------------------------------------------------------------------- placement

    def _batch(self, x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1))))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _scalar(self, x) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            rows = np.arange(start, stop)
            pad = np.full(self.batch_size - len(rows), stop - 1)  # repeat the last row
            yield rows, np.concatenate([rows, pad]).astype(np.int64)

    def _compile(self, key, build):
        if key not in self._compiled:
            self._compiled[key] = jax.jit(build(), out_shardings=self.replicated)
        return self._compiled[key]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(list(texts), self.text_length).astype(np.int32)

    # ---------------------------------------------------------------------------------- images

    def num_conditions(self, task: str) -> int:
        return tasks_lib.num_conditions(tasks_lib.check_task(task), self.num_compose_refs)

    def generate(self, params, task: str, prompts: Sequence[str], cond_images: np.ndarray | None = None, *,
                 settings: Settings = Settings(), indices: Sequence[int] | None = None,
                 on_chunk: Callable[[int], object] | None = None) -> np.ndarray:
        """uint8 (n, R, R, 3) images for `prompts` (and uint8 condition images (n, K, R, R, 3))."""
        if task not in IMAGE_TASKS:
            raise ValueError(f"task {task!r} does not generate images (image tasks: {', '.join(IMAGE_TASKS)})")
        n, k = len(prompts), self.num_conditions(task)
        if k:
            if cond_images is None or np.shape(cond_images)[:2] != (n, k):
                raise ValueError(f"{task}: needs {k} condition image(s) per prompt, (n, {k}, R, R, 3); got "
                                 f"{None if cond_images is None else np.shape(cond_images)}")
            r = self.resolution
            if np.shape(cond_images)[2:] != (r, r, 3):
                raise ValueError(f"{task}: condition images must be {r}x{r}x3, got {np.shape(cond_images)[2:]}")
        elif cond_images is not None:
            raise ValueError(f"{task} takes no condition images")
        use_cfg = settings.guidance > 1.0
        sigmas = schedule.flow_sigmas(settings.image_steps, settings.shift)
        # One program per condition count and guidance on/off (edit and perception share one).
        fn = self._compile(("image", k, use_cfg), lambda: image_lib.build_image_sampler(
            self.graphdef, self.frozen.text_encoder, self.frozen.codec_graphdef, self.latent_shape,
            use_cfg))
        ids = self.encode_texts(prompts)
        neg = self.encode_texts([settings.negative_prompt])[0]
        indices = np.arange(n) if indices is None else np.asarray(indices)
        out = np.zeros((n, self.resolution, self.resolution, 3), np.uint8)
        for rows, padded in self._chunks(n):
            cond = None if not k else self._batch(to_float(np.asarray(cond_images)[padded]))
            with create.sharding_context(self.mesh, self.rules):
                pixels = fn(params, self.frozen.arrays["text"], self.frozen.arrays["codec"],
                            self._batch(ids[padded]), self._batch(np.repeat(neg[None], len(padded), 0)), cond,
                            self._scalar(np.uint32(settings.seed)), self._batch(indices[padded].astype(np.int32)),
                            self._scalar(sigmas), self._scalar(np.float32(settings.guidance)))
            out[rows] = to_uint8(jax.device_get(pixels))[: len(rows)]
            if on_chunk:
                on_chunk(len(rows))
        return out

    # ----------------------------------------------------------------------------------- texts

    def question_prefix(self, question: str) -> tuple[np.ndarray, int]:
        """A VQA question's ids (with its EOS) and its length: the fixed prefix."""
        ids = self.encode_texts([question])[0]
        return ids, num_tokens(ids, self.tokenizer.eos_id)

    def describe_ids(self, params, task: str, images: np.ndarray, questions: Sequence[str] | None = None, *,
                     settings: Settings = Settings(), indices: Sequence[int] | None = None,
                     use_cache: bool | None = None, on_chunk: Callable[[int], object] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, int]:
        """(token ids (n, L), prefix lengths (n,), model calls summed over chunks)."""
        if task not in TEXT_TASKS:
            raise ValueError(f"task {task!r} does not generate text (text tasks: {', '.join(TEXT_TASKS)})")
        images = np.asarray(images)
        n, r = len(images), self.resolution
        if images.shape[1:] != (r, r, 3):
            raise ValueError(f"{task}: images must be (n, {r}, {r}, 3), got {images.shape}")
        if task == "vqa":
            if questions is None or len(questions) != n:
                raise ValueError("vqa: one question per image")
            pairs = [self.question_prefix(q) for q in questions]
            prefix = np.stack([p[0] for p in pairs])
            prefix_len = np.array([p[1] for p in pairs], np.int32)
        else:
            if questions is not None:
                raise ValueError("caption takes no question (use the vqa task)")
            prefix = np.zeros((n, self.text_length), np.int32)
            prefix_len = np.zeros((n,), np.int32)
            if self.caption_prompt:  # the run's fixed caption question (input.caption_prompt)
                ids, length = self.question_prefix(self.caption_prompt)
                prefix[:], prefix_len[:] = ids, length
        if n and prefix_len.max() >= self.text_length:
            what = "input.caption_prompt" if task == "caption" else "the question"
            raise ValueError(f"{task}: {what} fills the whole {self.text_length}-token text "
                             "(input.text_length); nothing is left to sample")
        steps, order, temperature = int(settings.text_steps), settings.text_order, float(settings.text_temperature)
        fn = self._compile(("text", steps, order, temperature), lambda: text_lib.build_text_sampler(
            self.graphdef, self.frozen.text_encoder, self.frozen.codec_graphdef,
            self.tokenizer.mask_id, steps, order, temperature))
        cache = settings.text_cache if use_cache is None else use_cache
        indices = np.arange(n) if indices is None else np.asarray(indices)
        out = np.zeros((n, self.text_length), np.int32)
        calls = 0
        for rows, padded in self._chunks(n):
            with create.sharding_context(self.mesh, self.rules):
                ids, c = fn(params, self.frozen.arrays["text"], self.frozen.arrays["codec"],
                            self._batch(to_float(images[padded])), self._batch(prefix[padded]),
                            self._batch(prefix_len[padded]), self._scalar(np.uint32(settings.seed)),
                            self._batch(indices[padded].astype(np.int32)), self._scalar(np.bool_(cache)))
            out[rows] = np.asarray(jax.device_get(ids))[: len(rows)]
            calls += int(jax.device_get(c))
            if on_chunk:
                on_chunk(len(rows))
        return out, prefix_len, calls

    def decode(self, ids: np.ndarray, prefix_len: np.ndarray | None = None, stop_at_eos: bool = True) -> list[str]:
        """Texts of sampled ids: the tokens after the prefix (VQA: the answer), up to the first EOS
        when `stop_at_eos` (the model is trained on EOS-padded sequences: what follows is padding),
        else every non-EOS token (the official `decode(...).replace('</s>', '')`)."""
        texts = []
        for b, row in enumerate(np.asarray(ids)):
            start = 0 if prefix_len is None else int(prefix_len[b])
            row = row[start:]
            if stop_at_eos:
                row = row[: num_tokens(row, self.tokenizer.eos_id)]
            texts.append(self.tokenizer.decode(row[None])[0].strip())
        return texts

    def describe(self, params, task: str, images: np.ndarray, questions: Sequence[str] | None = None, *,
                 settings: Settings = Settings(), indices: Sequence[int] | None = None,
                 on_chunk: Callable[[int], object] | None = None) -> list[str]:
        ids, prefix_len, _ = self.describe_ids(params, task, images, questions, settings=settings, indices=indices,
                                               on_chunk=on_chunk)
        return self.decode(ids, prefix_len)


__all__ = ["Sampler", "Settings", "to_uint8", "to_float", "num_tokens", "IMAGE_TASKS", "TEXT_TASKS"]
