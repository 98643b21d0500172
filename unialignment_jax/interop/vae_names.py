"""The VAE name table: our `AutoencoderKL` paths <-> diffusers `AutoencoderKL` state-dict keys.

Our paths are diffusers' module names with '/' for '.', so most rows only rename the leaf:

  torch                               ours                       kind
  <conv>.weight (out, in, kh, kw)     <conv>/kernel (kh, kw, in, out)   conv
  <conv>.bias, <linear>.bias          <...>/bias                        vector
  <norm>.weight, <norm>.bias          <norm>/scale, <norm>/bias         vector
  <linear>.weight (out, in)           <linear>/kernel (in, out)         kernel

Three names differ: the down/up samplers' `downsamplers.0.conv` / `upsamplers.0.conv` are our
`downsamplers/0` / `upsamplers/0` (the conv itself), and the attention's `to_out.0` is `to_out`.
The rows are generated from the architecture (`VAEConfig`, read from the checkpoint's config.json),
so a checkpoint with another depth or width fails with the tensors named.
"""

from __future__ import annotations

from unialignment_jax.interop.names import Row
from unialignment_jax.models.vae import VAEConfig


def _conv(ours: str, torch: str) -> list[Row]:
    return [Row(f"{ours}/kernel", (f"{torch}.weight",), "conv"), Row(f"{ours}/bias", (f"{torch}.bias",), "vector")]


def _linear(ours: str, torch: str) -> list[Row]:
    return [Row(f"{ours}/kernel", (f"{torch}.weight",), "kernel"), Row(f"{ours}/bias", (f"{torch}.bias",), "vector")]


def _norm(ours: str, torch: str) -> list[Row]:
    return [Row(f"{ours}/scale", (f"{torch}.weight",), "vector"), Row(f"{ours}/bias", (f"{torch}.bias",), "vector")]


def _path(torch: str) -> str:
    return torch.replace(".", "/")


def _resnet(prefix: str, shortcut: bool) -> list[Row]:
    rows = []
    for norm, conv in (("norm1", "conv1"), ("norm2", "conv2")):
        rows += _norm(_path(f"{prefix}.{norm}"), f"{prefix}.{norm}")
        rows += _conv(_path(f"{prefix}.{conv}"), f"{prefix}.{conv}")
    if shortcut:
        rows += _conv(_path(f"{prefix}.conv_shortcut"), f"{prefix}.conv_shortcut")
    return rows


def _mid(prefix: str, add_attention: bool) -> list[Row]:
    rows = _resnet(f"{prefix}.resnets.0", False)
    if add_attention:
        a = f"{prefix}.attentions.0"
        rows += _norm(_path(f"{a}.group_norm"), f"{a}.group_norm")
        for name in ("to_q", "to_k", "to_v"):
            rows += _linear(_path(f"{a}.{name}"), f"{a}.{name}")
        rows += _linear(_path(f"{a}.to_out"), f"{a}.to_out.0")
    return rows + _resnet(f"{prefix}.resnets.1", False)


def vae_rows(cfg: VAEConfig) -> list[Row]:
    """Every parameter of `AutoencoderKL(cfg)`."""
    ch = cfg.block_out_channels
    rows = _conv("encoder/conv_in", "encoder.conv_in")
    for i, cout in enumerate(ch):
        cin = ch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block):
            rows += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", shortcut=(j == 0 and cin != cout))
        if i < len(ch) - 1:
            rows += _conv(f"encoder/down_blocks/{i}/downsamplers/0", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    rows += _mid("encoder.mid_block", cfg.mid_block_add_attention)
    rows += _norm("encoder/conv_norm_out", "encoder.conv_norm_out") + _conv("encoder/conv_out", "encoder.conv_out")

    rev = tuple(reversed(ch))
    rows += _conv("decoder/conv_in", "decoder.conv_in")
    rows += _mid("decoder.mid_block", cfg.mid_block_add_attention)
    for i, cout in enumerate(rev):
        cin = rev[max(i - 1, 0)]
        for j in range(cfg.layers_per_block + 1):
            rows += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", shortcut=(j == 0 and cin != cout))
        if i < len(rev) - 1:
            rows += _conv(f"decoder/up_blocks/{i}/upsamplers/0", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    rows += _norm("decoder/conv_norm_out", "decoder.conv_norm_out") + _conv("decoder/conv_out", "decoder.conv_out")

    if cfg.use_quant_conv:
        rows += _conv("quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        rows += _conv("post_quant_conv", "post_quant_conv")
    return rows
