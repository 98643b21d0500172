"""The diffusers SD3 table: official UniAlignment keys <-> `SD3Transformer2DModel` keys.

The official model is SD3's transformer changed in four places (docs/method.md, "Backbone"); this module says,
for each official key, where it lives in a diffusers `SD3Transformer2DModel` state dict, and what
has no place there (the side file of `export --format diffusers`, re-initialised on an SD3 import).

  official key                                    diffusers SD3 key
  ----------------------------------------------  ---------------------------------------------
  pos_embed.*, context_embedder.*                 same
  time_text_embed.timestep_embedder.*             same (the timestep MLP; the sinusoid is SD3's
                                                  Timesteps(256), so model.timestep_dim must be 256)
  (none: the pooled CLIP projection was removed)  time_text_embed.text_embedder.linear_{1,2}.*
                                                  export: zeros, so SD3's conditioning is the
                                                  timestep embedding alone whatever pooled input it
                                                  gets; import: dropped (reported)
  transformer_blocks.{i}.* for i < L-1            same
  transformer_blocks.{L-1}, image stream          same (norm1, attn.to_q/k/v, attn.to_out.0, ff)
  transformer_blocks.{L-1}.attn.add_{q,k,v}_proj  same (SD3's context-pre-only block still makes
                                                  the text tokens' keys and values)
  transformer_blocks.{L-1}.norm1_context.linear   SD3: AdaLayerNormContinuous, 2*dim rows = [scale;
     (AdaLN-Zero, 6*dim rows = [shift; scale;        shift]. Export writes [official scale; official
      gate; shift2; scale2; gate2])                  shift]; an SD3 import fills shift/scale from it
                                                  and zeros the gates and the MLP shift/scale
                                                  (AdaLN-Zero), so the image stream of the last
                                                  block computes exactly SD3's and the rebuilt text
                                                  path starts as the identity
  transformer_blocks.{L-1}.attn.to_add_out,       absent (SD3's last block has no text output):
     ff_context.net.{0.proj,2}                     side file / re-initialised
  image_norm_out.linear, image_proj_out           norm_out.linear, proj_out (the same modules:
                                                  AdaLayerNormContinuous + Linear to p*p*C, same
                                                  unpatchify), so an exported SD3 model computes
                                                  our image velocity
  text_proj_out, null_image_embd,                 absent: side file / re-initialised
     siglip_adapter_{img,text}.*

`text_norm_out` has no parameters. With `model.qk_norm` the blocks' `attn.norm_{q,k}` and
`attn.norm_added_{q,k}` map one to one (diffusers keeps `norm_added_*` in the last block too).
SD3.5's dual-attention blocks (`attn2`, 9*dim `norm1`) have no counterpart: an error.
"""

from __future__ import annotations

import numpy as np

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
EXTRA_WEIGHTS = "unialignment_extra.safetensors"  # the side file of a diffusers export
TEXT_EMBEDDER = "time_text_embed.text_embedder."
SD3_MEDIUM_POOLED_DIM = 2048  # SD3-medium's pooled_projection_dim (CLIP-L + CLIP-G)

# official prefix -> diffusers prefix (the image head)
RENAMES = (("image_norm_out.linear.", "norm_out.linear."), ("image_proj_out.", "proj_out."))
# official keys with no diffusers counterpart anywhere
HEAD_ONLY_PREFIXES = ("text_proj_out.", "null_image_embd", "siglip_adapter_img.", "siglip_adapter_text.")
# the last block's text-output path, which SD3's context-pre-only block lacks
LAST_BLOCK_TEXT_ONLY = ("attn.to_add_out.", "ff_context.")


def last_block(num_layers: int) -> str:
    return f"transformer_blocks.{num_layers - 1}."


def context_norm_keys(num_layers: int) -> tuple[str, str]:
    b = last_block(num_layers)
    return b + "norm1_context.linear.weight", b + "norm1_context.linear.bias"


def is_side_only(key: str, num_layers: int) -> bool:
    """True for official keys that SD3's layout has no place for (the side file's tensors)."""
    if key.startswith(HEAD_ONLY_PREFIXES):
        return True
    b = last_block(num_layers)
    return key.startswith(tuple(b + p for p in LAST_BLOCK_TEXT_ONLY))


def to_diffusers_key(key: str) -> str:
    """An official key's diffusers name (the image head renamed; everything else unchanged)."""
    for ours, theirs in RENAMES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def from_diffusers_key(key: str) -> str:
    for ours, theirs in RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


# -------------------------------------------------- the last block's text modulation (norm1_context)


def continuous_from_zero(t: np.ndarray, dim: int) -> np.ndarray:
    """Official AdaLN-Zero rows [shift; scale; ...] (6*dim, ...) -> SD3's continuous [scale; shift]."""
    return np.ascontiguousarray(np.concatenate([t[dim:2 * dim], t[:dim]], axis=0))


def zero_from_continuous(t: np.ndarray, dim: int, rest: np.ndarray | None = None) -> np.ndarray:
    """SD3's continuous [scale; shift] (2*dim, ...) -> AdaLN-Zero rows [shift; scale; rest], where
    `rest` (4*dim rows: gate, MLP shift, MLP scale, MLP gate) defaults to zeros."""
    if rest is None:
        rest = np.zeros((4 * dim,) + t.shape[1:], t.dtype)
    return np.concatenate([t[dim:2 * dim], t[:dim], rest.astype(t.dtype, copy=False)], axis=0)


def diffusers_config(cfg, pooled_projection_dim: int = SD3_MEDIUM_POOLED_DIM, version: str = "0.31.0") -> dict:
    """`SD3Transformer2DModel`'s config.json for one of our DiTConfigs."""
    return {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": version,
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "num_layers": cfg.num_layers,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "caption_projection_dim": cfg.width,
        "pooled_projection_dim": pooled_projection_dim,
        "out_channels": cfg.out_channels,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": [],
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }


def diffusers_incompatibilities(cfg) -> list[str]:
    """Why a DiTConfig cannot be written in SD3's layout (empty when it can)."""
    problems = []
    if cfg.timestep_dim != 256:
        problems.append(f"model.timestep_dim = {cfg.timestep_dim}: SD3's timestep embedder takes a 256-d sinusoid")
    if cfg.mlp_ratio != 4:
        problems.append(f"model.mlp_ratio = {cfg.mlp_ratio}: SD3's FeedForward has 4x expansion")
    if cfg.num_layers < 1:
        problems.append("model.num_layers must be >= 1")
    return problems
