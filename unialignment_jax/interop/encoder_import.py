"""Importing the frozen encoders: HF `T5EncoderModel` and diffusers `AutoencoderKL` safetensors.

Both stream the checkpoint tensor by tensor onto the target shardings (`streaming.py`) through
their name tables (`t5_names.py`, `vae_names.py`), after checking the whole checkpoint against the
table. With `mesh=None` the model lands on the first local device (tests, conversion tools).
Every path may be a URI (`gs://...`, through etils epath: unialignment_jax/paths.py); remote
safetensors are read tensor by tensor (safetensors_io.py).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from flax import nnx

from unialignment_jax import paths
from unialignment_jax.interop import streaming, t5_names, vae_names
from unialignment_jax.interop.convert import CheckpointMismatch
from unialignment_jax.interop.safetensors_io import Checkpoint, SafetensorsFile, read_json
from unialignment_jax.models.t5 import T5Config, T5Encoder
from unialignment_jax.models.vae import AutoencoderKL, VAEConfig

T5_FILES = ("model.safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors",)
# HF config.json fields that must agree with our T5Config when a config.json sits next to the weights.
_T5_CHECKED_FIELDS = ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size",
                      "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")


def _check_hf_t5_config(path: str, cfg: T5Config) -> None:
    """If the checkpoint directory has a config.json, its T5 hyper-parameters must equal ours."""
    cfg_path = paths.join(path if paths.is_dir(path) else paths.parent(path), "config.json")
    if not paths.is_file(cfg_path):
        return
    hf = read_json(cfg_path)
    if hf.get("model_type", "t5") != "t5":
        raise CheckpointMismatch(f"{cfg_path}: model_type {hf.get('model_type')!r} is not a T5 model")
    if hf.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointMismatch(f"{cfg_path}: feed_forward_proj = {hf['feed_forward_proj']!r}; "
                                 "only T5 v1.1 ('gated-gelu') is implemented")
    bad = [f"{k} = {hf[k]!r} (ours {getattr(cfg, k)!r})" for k in _T5_CHECKED_FIELDS
           if k in hf and hf[k] != getattr(cfg, k)]
    if bad:
        raise CheckpointMismatch(f"{cfg_path} does not match text_encoder config: " + "; ".join(bad))


def read_mask_embedding(path: str, d_model: int) -> np.ndarray:
    """The replacement `<extra_id_0>` row: a .npy array or a .safetensors file with one tensor,
    of shape (d_model,) or (1, d_model). (The official file is a torch pickle: convert it once with
    `unialignment convert-mask` (interop/convert_mask.py); pickles are never read here.)"""
    if path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"text_encoder.mask_embedding = {path!r}: a PyTorch pickle, never read here; convert it "
                         "once: unialignment convert-mask --source FILE --out FILE.safetensors")
    if not paths.is_file(path):
        raise ValueError(f"text_encoder.mask_embedding = {path!r}: no such file")
    if path.endswith(".npy"):
        try:
            if paths.is_remote(path):
                with paths.open_file(path, "rb") as fin:
                    x = np.load(fin, allow_pickle=False)
            else:
                x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"text_encoder.mask_embedding = {path!r}: cannot read ({e})") from None
    elif path.endswith(".safetensors"):
        try:
            f = SafetensorsFile(path)
            if len(f.keys()) != 1:
                raise ValueError(f"expected one tensor, found {f.keys()}")
            x = np.asarray(f.array(f.keys()[0]))
        except ValueError as e:
            raise ValueError(f"text_encoder.mask_embedding = {path!r}: {e}") from None
    else:
        raise ValueError(f"text_encoder.mask_embedding = {path!r}: use a .npy or .safetensors file")
    if x.shape not in ((d_model,), (1, d_model)):
        raise ValueError(f"text_encoder.mask_embedding = {path!r}: shape {x.shape}, expected ({d_model},)")
    return np.asarray(x, np.float32).reshape(d_model)


def set_mask_embedding(model: T5Encoder, row: np.ndarray) -> None:
    """Replace the mask token's row, keeping the parameter's sharding and dtype."""
    if model.mask_embedding is None:
        raise ValueError("the text encoder has no mask embedding (mask_token_id is None)")
    old = model.mask_embedding[...]
    model.mask_embedding[...] = jax.device_put(np.asarray(row, old.dtype), old.sharding)


def load_t5(path: str, cfg: T5Config, mesh=None, rules=None, seed: int = 0) -> T5Encoder:
    """A `T5Encoder(cfg)` with HF T5EncoderModel weights from `path` (a .safetensors file, an
    index json, or a directory with model.safetensors[.index.json])."""
    ckpt = Checkpoint(path, T5_FILES)
    _check_hf_t5_config(path, cfg)
    graphdef, abstract = streaming.abstract_model(lambda: T5Encoder(cfg, rngs=nnx.Rngs(seed)), mesh, rules)
    flat = streaming.flat_leaves(abstract)
    rows = t5_names.t5_rows()
    key_map = streaming.check(ckpt, rows, flat, cfg.num_layers, t5_names.TIED_ALIASES, t5_names.IGNORED_PREFIXES)
    values = streaming.stream(ckpt, rows, flat, cfg.num_layers, key_map, desc="T5 weights")
    if cfg.mask_token_id is not None:
        table = ckpt.array(key_map[t5_names.EMBED_KEY])
        row = lambda idx: table[cfg.mask_token_id][idx]  # one row of the table, not the table
        values["mask_embedding"] = streaming.make_sharded(row, flat["mask_embedding"])
    logging.info("loaded T5 encoder weights from %s", ckpt.path)
    return streaming.merge_loaded(graphdef, abstract, values)


def vae_config_from_dir(path: str, **overrides: Any) -> VAEConfig:
    cfg_path = paths.join(path, "config.json")
    if not paths.is_file(cfg_path):
        raise FileNotFoundError(f"{path}: a diffusers AutoencoderKL directory needs config.json")
    try:
        return VAEConfig.from_diffusers(read_json(cfg_path), **overrides)
    except ValueError as e:
        raise CheckpointMismatch(f"{cfg_path}: {e}") from None


def load_vae(path: str, mesh=None, rules=None, **overrides: Any) -> AutoencoderKL:
    """An `AutoencoderKL` from a diffusers directory (config.json drives the architecture; the
    `overrides`, e.g. dtype, scaling_factor, shift_factor, replace config values)."""
    if not paths.is_dir(path):
        raise FileNotFoundError(f"codec.weights = {path!r}: expected a diffusers AutoencoderKL directory")
    cfg = vae_config_from_dir(path, **overrides)
    ckpt = Checkpoint(path, DIFFUSERS_FILES)
    graphdef, abstract = streaming.abstract_model(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    flat = streaming.flat_leaves(abstract)
    rows = vae_names.vae_rows(cfg)
    key_map = streaming.check(ckpt, rows, flat, num_layers=0)
    values = streaming.stream(ckpt, rows, flat, 0, key_map, desc="VAE weights")
    logging.info("loaded VAE weights from %s", ckpt.path)
    return streaming.merge_loaded(graphdef, abstract, values)
