"""`unialignment convert-mask`: the official aligned MASK row (a torch pickle) as safetensors.

  unialignment convert-mask --source mask_token_emb.00-of-01.pth --out weights/mask_token_emb.safetensors
                            [--config C]

When the official training starts from the Dual Diffusion weights it writes this row into T5's
embedding row 32099 (`<extra_id_0>`). The file is read once here with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only: a pickle that
holds anything else (code, custom classes) is refused. It may hold a tensor, or a dict with exactly
one tensor or one under a known key (KNOWN_KEYS), of shape (d,) or (1, d); with `--config`, d must
be that config's `text_encoder.d_model`. The output holds one tensor, key `mask_token_emb`, shape
(d,), in the source's float dtype (the official bfloat16 row is kept bit for bit; the reader,
`encoder_import.read_mask_embedding`, widens it to float32). Point `text_encoder.mask_embedding`
at it. A separate command, not an `import` flag: it writes one small file, needs no run, mesh or
model, and is run once per downloaded file, while `import` starts a run from DiT weights.

--source and --out may be URIs (`gs://...`); --out must not exist (nothing is overwritten).
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tempfile

import ml_dtypes
import numpy as np

from unialignment_jax import paths
from unialignment_jax.interop.safetensors_write import save_file
from unialignment_jax.models.t5 import T5Config

MASK_KEY = "mask_token_emb"  # the key `export` writes; read_mask_embedding reads any single tensor
KNOWN_KEYS = (MASK_KEY, "mask_token_embedding", "mask_embedding", "weight")
FLOAT_DTYPES = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.bfloat16": ml_dtypes.bfloat16}


class ConvertError(ValueError):
    """A source that is not a mask row, or an output that cannot be written; the message names the file."""


def _torch():
    # torch is an optional dependency (the [torch] extra): only this command's .pth reader needs it.
    try:
        import torch
    except ImportError:
        raise ConvertError("reading a PyTorch .pth file needs torch: pip install 'unialignment_jax[torch]'") from None
    return torch


def load_pth(path: str):
    """`torch.load(path, weights_only=True)` on the CPU; a pickle holding more than tensors and plain
    containers is refused (ConvertError naming the file)."""
    torch = _torch()
    if not paths.is_file(path):
        raise ConvertError(f"--source {path}: no such file")
    with paths.open_file(path, "rb") as f:
        data = io.BytesIO(f.read())
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"--source {path}: refused by torch.load(weights_only=True): the file holds more than "
                           f"tensors and plain containers, or is not a PyTorch file ({_unpickler_reason(e)})") from None
    except Exception as e:  # torch.load raises many types (KeyError, RuntimeError, EOFError) on malformed files
        raise ConvertError(f"--source {path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None


def _unpickler_reason(error: Exception) -> str:
    """The weights-only unpickler's own reason (e.g. "Unsupported global: GLOBAL m.Class ..."), without
    torch's advice on how to load the file unsafely."""
    lines = [line.strip() for line in str(error).replace("WeightsUnpickler error:", "\n").splitlines()]
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    reasons = [line.split(" Please use")[0] for line in lines if line and not line.startswith(advice)]
    return (reasons[0] if reasons else type(error).__name__)[:300]


def pick_tensor(obj, path: str):
    """The one tensor in `obj`: itself, or the value of a dict holding one tensor (or a KNOWN_KEYS one)."""
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        known = [k for k in KNOWN_KEYS if isinstance(obj.get(k), torch.Tensor)]
        tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if known:
            return obj[known[0]]
        if len(tensors) == 1:
            return obj[tensors[0]]
        raise ConvertError(f"--source {path}: a dict with {len(tensors)} tensors ({', '.join(map(str, obj))[:200]}); "
                           f"expected one tensor, or one under {', '.join(KNOWN_KEYS)}")
    raise ConvertError(f"--source {path}: holds a {type(obj).__name__}, expected a tensor or a dict of one tensor")


def to_row(tensor, path: str, d_model: int | None = None) -> np.ndarray:
    """(d,) numpy array in the tensor's float dtype, after checking shape, width and values."""
    shape = tuple(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != 1) or shape[-1] == 0:
        raise ConvertError(f"--source {path}: tensor of shape {shape}, expected (d,) or (1, d)")
    if d_model is not None and shape[-1] != d_model:
        raise ConvertError(f"--source {path}: a row of {shape[-1]} values, but text_encoder.d_model = {d_model}")
    dtype = FLOAT_DTYPES.get(str(tensor.dtype))
    if dtype is None:
        raise ConvertError(f"--source {path}: dtype {tensor.dtype}, expected float32, float16 or bfloat16")
    # float32 holds every bfloat16 / float16 value exactly, so the round trip keeps the bits.
    row = tensor.detach().reshape(-1).float().numpy().astype(dtype)
    if not np.isfinite(row.astype(np.float32)).all():
        raise ConvertError(f"--source {path}: the row holds non-finite values")
    return row


def convert(source: str, out: str, d_model: int | None = None) -> np.ndarray:
    """Read the row from `source` (.pth), write it to `out` (.safetensors); returns the row."""
    if not out.endswith(".safetensors"):
        raise ConvertError(f"--out {out}: name it *.safetensors (text_encoder.mask_embedding reads "
                           ".npy or .safetensors)")
    if paths.exists(out):
        raise ConvertError(f"--out {out}: already exists (remove it first; nothing is overwritten)")
    row = to_row(pick_tensor(load_pth(source), source), source, d_model)
    metadata = {"source": paths.absolute(source), "written_by": "unialignment convert-mask"}
    if paths.is_remote(out):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(out))
            save_file(local, {MASK_KEY: row}, metadata)
            paths.copy_tree(local, out)
    else:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        partial = out + ".partial"
        save_file(partial, {MASK_KEY: row}, metadata)
        os.replace(partial, out)  # a reader never finds a half-written file
    return row


def run(args, config) -> int:
    d_model = T5Config.from_config(config.text_encoder).d_model if config is not None else None
    try:
        row = convert(args.source, args.out, d_model)
    except ConvertError as e:
        print(f"unialignment convert-mask: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {MASK_KEY} ({row.shape[0]},) {row.dtype}; train with "
          f"--config.text_encoder.mask_embedding={args.out}")
    return 0
