"""The name table: our parameter paths <-> the official UniAlignment PyTorch state-dict keys.

The official model (`SD3JointModelFlexible`, docs/method.md "Architecture") is diffusers' `SD3Transformer2DModel`
with every block non-context-pre-only, a timestep-only embedder and the UniAlignment heads, so its
keys are diffusers' SD3 keys plus `image_norm_out`, `image_proj_out`, `text_norm_out` (no
parameters), `text_proj_out`, `null_image_embd`, `siglip_adapter_img`, `siglip_adapter_text`.

Each row says how one of our arrays maps onto one or more torch tensors:

  kernel        ours (*in, *out)           torch Linear weight (prod(out), prod(in)): transpose
  vector        ours (*out)                torch bias (prod(out),)
  conv          ours (kh, kw, in, out)     torch Conv2d weight (out, in, kh, kw)
  copy          same shape both sides
  split_kernel  ours (in, 3, heads, dim)   three torch Linear weights (to_q, to_k, to_v)
  split_vector  ours (3, heads, dim)       three torch biases

Block rows (`per_layer=True`) hold our stacked array (leading `layers` axis); torch has one
tensor per block, `transformer_blocks.{i}.<key>`. `pos_embed.pos_embed` is the fixed sin-cos
buffer: not a parameter of ours, written on export so that `load_state_dict(strict=True)` works.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Row:
    ours: str  # '/'-joined path in the model's nnx.State
    torch: tuple[str, ...]  # torch keys; '{i}' is the block index for per-layer rows
    kind: str
    per_layer: bool = False
    n_in: int = 1  # input axes of a kernel (attention `out` kernels are (heads, dim, width))


def _linear(ours: str, torch: str, per_layer: bool = False, bias: bool = True, n_in: int = 1) -> list[Row]:
    rows = [Row(f"{ours}/kernel", (f"{torch}.weight",), "kernel", per_layer, n_in)]
    if bias:
        rows.append(Row(f"{ours}/bias", (f"{torch}.bias",), "vector", per_layer))
    return rows


def _stream(ours: str, torch_attn: dict[str, str], ff: str, mod: str, qk_norm: bool) -> list[Row]:
    b = "transformer_blocks.{i}."
    q, k, v = (b + torch_attn[n] for n in ("q", "k", "v"))
    rows = [
        *_linear(f"blocks/{ours}/modulation", b + mod, per_layer=True),
        Row(f"blocks/{ours}/qkv/kernel", (f"{q}.weight", f"{k}.weight", f"{v}.weight"), "split_kernel", True),
        Row(f"blocks/{ours}/qkv/bias", (f"{q}.bias", f"{k}.bias", f"{v}.bias"), "split_vector", True),
        *_linear(f"blocks/{ours}/out", b + torch_attn["out"], per_layer=True, n_in=2),
        *_linear(f"blocks/{ours}/mlp_in", b + ff + ".net.0.proj", per_layer=True),
        *_linear(f"blocks/{ours}/mlp_out", b + ff + ".net.2", per_layer=True),
    ]
    if qk_norm:
        rows += [
            Row(f"blocks/{ours}/norm_q/weight", (b + torch_attn["norm_q"] + ".weight",), "copy", True),
            Row(f"blocks/{ours}/norm_k/weight", (b + torch_attn["norm_k"] + ".weight",), "copy", True),
        ]
    return rows


def official_rows(qk_norm: bool = False) -> list[Row]:
    """Every parameter of the official UniAlignment model class, in state-dict order."""
    img_attn = dict(q="attn.to_q", k="attn.to_k", v="attn.to_v", out="attn.to_out.0",
                    norm_q="attn.norm_q", norm_k="attn.norm_k")
    txt_attn = dict(q="attn.add_q_proj", k="attn.add_k_proj", v="attn.add_v_proj", out="attn.to_add_out",
                    norm_q="attn.norm_added_q", norm_k="attn.norm_added_k")
    return [
        Row("patch_embed/kernel", ("pos_embed.proj.weight",), "conv"),
        Row("patch_embed/bias", ("pos_embed.proj.bias",), "vector"),
        *_linear("time_embed_1", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("time_embed_2", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("context_embedder", "context_embedder"),
        *_stream("img", img_attn, "ff", "norm1.linear", qk_norm),
        *_stream("txt", txt_attn, "ff_context", "norm1_context.linear", qk_norm),
        *_linear("image_norm_out", "image_norm_out.linear"),
        *_linear("image_proj_out", "image_proj_out"),
        *_linear("text_proj_out", "text_proj_out"),
        Row("null_image_embd", ("null_image_embd",), "copy"),
        *_linear("adapter_img/fc1", "siglip_adapter_img.fc.0"),
        *_linear("adapter_img/fc2", "siglip_adapter_img.fc.2"),
        *_linear("adapter_txt/fc1", "siglip_adapter_text.fc.0"),
        *_linear("adapter_txt/fc2", "siglip_adapter_text.fc.2"),
    ]


POS_EMBED_KEY = "pos_embed.pos_embed"


# ---------------------------------------------------------------------------- tensor conversion


def to_torch(row: Row, x: np.ndarray) -> list[np.ndarray]:
    """One of our arrays (one layer's slice for block rows) -> the torch tensors of its row."""
    kind = row.kind
    if kind == "kernel":
        fan_in = int(np.prod(x.shape[: row.n_in]))
        out = [x.reshape(fan_in, -1).T]
    elif kind == "vector":
        out = [x.reshape(-1)]
    elif kind == "conv":
        out = [x.transpose(3, 2, 0, 1)]
    elif kind == "copy":
        out = [x]
    elif kind == "split_kernel":
        out = [x[:, j].reshape(x.shape[0], -1).T for j in range(x.shape[1])]
    elif kind == "split_vector":
        out = [x[j].reshape(-1) for j in range(x.shape[0])]
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    return [np.ascontiguousarray(t) for t in out]


def from_torch(row: Row, tensors: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The torch tensors of a row -> our array of `shape` (one layer's slice for block rows)."""
    kind = row.kind
    if kind == "kernel":
        return tensors[0].T.reshape(shape)
    if kind in ("vector", "copy"):
        return tensors[0].reshape(shape)
    if kind == "conv":
        return tensors[0].transpose(2, 3, 1, 0).reshape(shape)
    if kind == "split_kernel":
        return np.stack([w.T.reshape((shape[0],) + shape[2:]) for w in tensors], axis=1)
    if kind == "split_vector":
        return np.stack([b.reshape(shape[1:]) for b in tensors], axis=0)
    raise ValueError(f"unknown row kind {kind!r}")


def torch_shapes(row: Row, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The torch tensor shapes a row expects, given our (per-layer) shape."""
    prod = lambda s: int(np.prod(s))
    kind = row.kind
    if kind == "kernel":
        return [(prod(shape[row.n_in:]), prod(shape[: row.n_in]))]
    if kind == "vector":
        return [(prod(shape),)]
    if kind == "conv":
        return [(shape[3], shape[2], shape[0], shape[1])]
    if kind == "copy":
        return [tuple(shape)]
    if kind == "split_kernel":
        return [(prod(shape[2:]), shape[0])] * shape[1]
    if kind == "split_vector":
        return [(prod(shape[1:]),)] * shape[0]
    raise ValueError(f"unknown row kind {kind!r}")
