"""The files of an export bundle (interop/export.py is the command that restores a run and writes
them atomically): the official class's constructor config, the scheduler and tokenizer settings,
the mask-token row, and the transformer's weights written one tensor at a time in the official or
diffusers layout. The bundle's layout is described in interop/export.py.
"""

from __future__ import annotations

import os

import numpy as np

from unialignment_jax import progress
from unialignment_jax.config import mask_embedding_file
from unialignment_jax.interop import convert, sd3_names
from unialignment_jax.interop.safetensors_write import SafetensorsWriter

OFFICIAL_CLASS = "SD3JointModelFlexible"
OFFICIAL_DIFFUSERS_VERSION = "0.31.0"  # the diffusers release the official code pins
FORMATS = ("official", "diffusers")
MASK_FILE = "mask_token_emb.safetensors"
MASK_KEY = "mask_token_emb"
INFO_FILE = "export_info.json"
DEFAULT_SAMPLING_SHIFT = 3.0  # SD3-medium's scheduler


class ExportError(ValueError):
    """Bad arguments or a run that cannot be exported as asked; nothing was written."""


# ------------------------------------------------------------------------------------ configs


def official_config(cfg) -> dict:
    """The official class's constructor arguments (what `save_pretrained` would write), plus the
    sizes it hard-codes, which our PyTorch reference and `unialignment import` read (the official
    class takes **kwargs and ignores them)."""
    # SD3's constructor arguments (the official class subclasses it); its pooled projection is
    # removed, so pooled_projection_dim is unused there (SD3-medium's value).
    sd3 = sd3_names.diffusers_config(cfg, version=OFFICIAL_DIFFUSERS_VERSION)
    del sd3["dual_attention_layers"]
    return {
        **sd3,
        "_class_name": OFFICIAL_CLASS,
        "vocab_size": cfg.vocab_size,
        "timestep_dim": cfg.timestep_dim,
        "timestep_fp16_round": cfg.timestep_fp16_round,
        "num_null_tokens": cfg.num_null_tokens,
        "adapter_hidden": cfg.adapter_hidden,
        "adapter_out": cfg.adapter_out,
        "block_depth": cfg.block_depth,
    }


def official_class_deviations(cfg) -> list[str]:
    """Sizes the official class hard-codes that this model does not have: with any of them the
    export loads into our PyTorch reference (which takes them as arguments) but not into the
    official class as released."""
    out = []
    if cfg.timestep_dim != 256:
        out.append(f"timestep_dim {cfg.timestep_dim} (official: 256)")
    if cfg.num_null_tokens != 8:
        out.append(f"num_null_tokens {cfg.num_null_tokens} (official: 8)")
    if (cfg.width, cfg.adapter_hidden, cfg.adapter_out) != (1536, 2048, 3584):
        out.append(f"adapters {cfg.width}->{cfg.adapter_hidden}->{cfg.adapter_out} (official: 1536->2048->3584)")
    if cfg.mlp_ratio != 4:
        out.append(f"mlp_ratio {cfg.mlp_ratio} (official: 4)")
    if cfg.qk_norm:
        out.append("qk_norm (official: none)")
    if not cfg.timestep_fp16_round:
        out.append("timestep_fp16_round False (official: the sinusoid is cast to float16)")
    return out


def config_value(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def scheduler_config(config) -> dict:
    shift = config_value(config, "sampling.shift", None)
    if shift is None:
        shift = config_value(config, "sampling.timestep_shift", DEFAULT_SAMPLING_SHIFT)
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        "shift": float(shift),
        "use_dynamic_shifting": False,
    }


def tokenizer_config(config) -> dict:
    tok, te = config["tokenizer"], config["text_encoder"]
    byte, words = tok["kind"] == "byte", tok["kind"] == "words"
    pad = "</s>" if tok["pad_with"] == "eos" else "<pad>"
    out = {
        # The word tokenizer has no HF class with its layout: its vocabulary is written below.
        "tokenizer_class": None if words else ("ByT5Tokenizer" if byte else "T5Tokenizer"),
        "model_max_length": int(config["input"]["text_length"]),
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": pad,
        "extra_ids": 125 if byte else 100,  # words: 100 as T5
        "padding_side": "right", "truncation_side": "right",
        "unialignment": {
            "kind": tok["kind"], "pad_with": tok["pad_with"], "max_length": int(config["input"]["text_length"]),
            "padding": "max_length", "truncation": True, "append_eos": True,
            "mask_token": "<extra_id_0>", "mask_token_id": te["mask_token_id"],
            "vocab_size": config["model"]["vocab_size"], "use_attention_mask": te["use_attention_mask"],
        },
    }
    if words:
        from unialignment_jax.data.tokenizers import load_vocabulary

        out["unialignment"]["vocabulary"] = list(load_vocabulary(tok.get("vocabulary", "")))
        out["unialignment"]["word_ids_start"] = 3  # pad 0, eos 1, unk 2, words, then the sentinels
    return out


def mask_token_row(config) -> tuple[np.ndarray | None, str]:
    """(the run's `<extra_id_0>` embedding row or None, where it comes from / why there is none)."""
    from unialignment_jax.interop import encoder_import, t5_names
    from unialignment_jax.interop.safetensors_io import Checkpoint
    from unialignment_jax.models.t5 import T5Config

    te = config["text_encoder"]
    if te["mask_token_id"] is None or te["mask_token_id"] < 0:
        return None, "no mask row (text_encoder.mask_token_id = -1)"
    d_model = T5Config.from_config(te).d_model
    mask_file = mask_embedding_file(te)  # "none": the stock row, as below
    if mask_file:
        return encoder_import.read_mask_embedding(mask_file, d_model), f"text_encoder.mask_embedding ({mask_file})"
    if te["weights"]:
        ckpt = Checkpoint(te["weights"], encoder_import.T5_FILES)
        key = next((k for k in (t5_names.EMBED_KEY, *t5_names.TIED_ALIASES[t5_names.EMBED_KEY]) if k in ckpt), None)
        if key is None:
            raise ExportError(f"{ckpt.path}: no token embedding ({t5_names.EMBED_KEY}) to take the mask row from")
        row = np.array(ckpt.array(key)[te["mask_token_id"]], np.float32)
        return row, f"row {te['mask_token_id']} of {key} in {ckpt.path}"
    return None, "the run's T5 is randomly initialised (text_encoder.weights is empty): no mask row exported"


# -------------------------------------------------------------------------------- writing


class _NullWriter:
    def write(self, key, array):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _writer(directory: str | None, name: str, specs, metadata):
    if directory is None:  # not the writing process: still take part in the gathers
        return _NullWriter()
    return SafetensorsWriter(os.path.join(directory, name), specs, metadata)


def _nbytes(specs) -> dict[str, int]:
    return {key: int(np.prod(shape)) * np.dtype(dtype).itemsize for key, shape, dtype in specs}


class _Counted:
    """A writer that reports each tensor it writes (its size in the file) to the progress bar's `done`."""

    def __init__(self, writer, specs, done):
        self.writer, self.done, self.nbytes = writer, done, _nbytes(specs)

    def write(self, key, array):
        self.writer.write(key, array)
        self.done(self.nbytes[key])


def safetensors_metadata(info: dict, layout: str) -> dict[str, str]:
    return {"format": "pt", "unialignment_layout": layout, "unialignment_source_step": str(info["source_step"]),
            "unialignment_ema": str(bool(info["ema"])).lower(), "unialignment_exported_by": "unialignment_jax"}


def write_official(params, cfg, directory: str | None, info: dict) -> list[str]:
    """The official state dict into `directory`/diffusion_pytorch_model.safetensors, streamed."""
    specs = [(k, s, np.float32) for k, s in convert.expected_official_shapes(params, cfg).items()]
    with _writer(directory, sd3_names.DIFFUSERS_WEIGHTS, specs, safetensors_metadata(info, "official")) as w, \
            progress.tensor_bar(len(specs), sum(_nbytes(specs).values()), "export") as done:
        w = _Counted(w, specs, done)
        for key, tensor in convert.iter_official(params, cfg):
            w.write(key, tensor)
    return [sd3_names.DIFFUSERS_WEIGHTS]


def write_diffusers(params, cfg, directory: str | None, info: dict,
                    pooled_projection_dim: int = sd3_names.SD3_MEDIUM_POOLED_DIM) -> list[str]:
    """SD3's layout (diffusion_pytorch_model.safetensors) + the side file, streamed in one pass."""
    problems = sd3_names.diffusers_incompatibilities(cfg)
    if problems:
        raise ExportError("cannot write diffusers' SD3 layout: " + "; ".join(problems))
    dim, n = cfg.width, cfg.num_layers
    context_norm = set(sd3_names.context_norm_keys(n))
    main, extra = [], []
    for key, shape in convert.expected_official_shapes(params, cfg).items():
        if sd3_names.is_side_only(key, n):
            extra.append((key, shape, np.float32))
        elif key in context_norm:  # full AdaLN-Zero rows to the side file, SD3's [scale; shift] here
            extra.append((key, shape, np.float32))
            main.append((key, (2 * dim,) + tuple(shape[1:]), np.float32))
        else:
            main.append((sd3_names.to_diffusers_key(key), shape, np.float32))
    t = sd3_names.TEXT_EMBEDDER
    text_embedder = {t + "linear_1.weight": (dim, pooled_projection_dim), t + "linear_1.bias": (dim,),
                     t + "linear_2.weight": (dim, dim), t + "linear_2.bias": (dim,)}
    main += [(k, s, np.float32) for k, s in text_embedder.items()]
    with _writer(directory, sd3_names.DIFFUSERS_WEIGHTS, main, safetensors_metadata(info, "diffusers")) as wm, \
            _writer(directory, sd3_names.EXTRA_WEIGHTS, extra, safetensors_metadata(info, "unialignment_extra")) as we, \
            progress.tensor_bar(len(main) + len(extra), sum(_nbytes(main + extra).values()), "export") as done:
        wm, we = _Counted(wm, main, done), _Counted(we, extra, done)
        for key, tensor in convert.iter_official(params, cfg):
            if sd3_names.is_side_only(key, n):
                we.write(key, tensor)
            elif key in context_norm:
                we.write(key, tensor)
                wm.write(key, sd3_names.continuous_from_zero(tensor, dim))
            else:
                wm.write(sd3_names.to_diffusers_key(key), tensor)
        for key, shape in text_embedder.items():  # zeros: SD3's conditioning = the timestep embedding
            wm.write(key, np.zeros(shape, np.float32))
    return [sd3_names.DIFFUSERS_WEIGHTS, sd3_names.EXTRA_WEIGHTS]


__all__ = ["OFFICIAL_CLASS", "FORMATS", "MASK_FILE", "MASK_KEY", "INFO_FILE", "ExportError", "official_config",
           "official_class_deviations", "config_value", "scheduler_config", "tokenizer_config", "mask_token_row",
           "safetensors_metadata", "write_official", "write_diffusers"]
