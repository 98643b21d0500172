"""PyTorch reference of the official UniAlignment model class, for parity tests.

Mirrors `SD3JointModelFlexible` as docs/method.md ("Architecture") describes it: diffusers' `SD3Transformer2DModel`
with the last block rebuilt non-context-pre-only, a timestep-only embedder whose sinusoid is cast
to float16 (and back, so it also runs in float32 here), SD3's `norm_out`/`proj_out` replaced by an
image head and a text head, learned null image tokens, condition latents concatenated after the
target tokens, and the two alignment adapters reading block `block_depth`.

Written for this project from the description (not copied); its state-dict keys are the official
ones, which is what the name table and export are checked against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers import SD3Transformer2DModel


class TimestepOnlyEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256, fp16_round: bool = True):
        super().__init__()
        self.time_proj = Timesteps(num_channels=freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.fp16_round = fp16_round

    def forward(self, timestep):
        proj = self.time_proj(timestep)
        if self.fp16_round:  # the official code casts to float16 before the MLP
            proj = proj.to(torch.float16)
        return self.timestep_embedder(proj.to(self.timestep_embedder.linear_1.weight.dtype))


class AlignmentAdapter(nn.Module):
    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, out), nn.SiLU())

    def forward(self, tokens):
        return self.fc(tokens.mean(dim=1))


class UniAlignmentReference(SD3Transformer2DModel):
    def __init__(self, vocab_size: int, sample_size: int, patch_size: int, in_channels: int, num_layers: int,
                 attention_head_dim: int, num_attention_heads: int, joint_attention_dim: int,
                 out_channels: int, pos_embed_max_size: int, timestep_dim: int = 256,
                 timestep_fp16_round: bool = True, num_null_tokens: int = 8, adapter_hidden: int = 2048,
                 adapter_out: int = 3584, qk_norm: str | None = None):
        width = attention_head_dim * num_attention_heads
        super().__init__(sample_size=sample_size, patch_size=patch_size, in_channels=in_channels,
                         num_layers=num_layers, attention_head_dim=attention_head_dim,
                         num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
                         caption_projection_dim=width, pooled_projection_dim=width, out_channels=out_channels,
                         pos_embed_max_size=pos_embed_max_size, qk_norm=qk_norm)
        self.transformer_blocks[-1] = JointTransformerBlock(
            dim=width, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            context_pre_only=False, qk_norm=qk_norm)
        self.norm_out = None
        self.proj_out = None
        self.time_text_embed = TimestepOnlyEmbedding(width, timestep_dim, timestep_fp16_round)
        self.image_norm_out = AdaLayerNormContinuous(width, width, elementwise_affine=False, eps=1e-6)
        self.image_proj_out = nn.Linear(width, patch_size * patch_size * out_channels)
        self.text_norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.text_proj_out = nn.Linear(width, vocab_size)
        self.null_image_embd = nn.Parameter(torch.randn(1, num_null_tokens, width) / width**0.5)
        self.siglip_adapter_img = AlignmentAdapter(width, adapter_hidden, adapter_out)
        self.siglip_adapter_text = AlignmentAdapter(width, adapter_hidden, adapter_out)

    def forward(self, hidden_states, encoder_hidden_states, timestep, cond_states=None, block_depth=None):
        """hidden_states (B, C, H, W) or None; cond_states: list of (B, C, H, W) condition latents."""
        if hidden_states is not None:
            height, width = hidden_states.shape[-2:]
            img = self.pos_embed(hidden_states)
        else:
            img = self.null_image_embd.repeat(encoder_hidden_states.shape[0], 1, 1)
        n_target = img.shape[1]
        for cond in cond_states or []:
            img = torch.cat([img, self.pos_embed(cond)], dim=1)
        temb = self.time_text_embed(timestep)
        txt = self.context_embedder(encoder_hidden_states)
        tap_img = tap_txt = None
        for i, block in enumerate(self.transformer_blocks):
            txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb)
            if block_depth is not None and i + 1 == block_depth:
                tap_img = self.siglip_adapter_img(img[:, :n_target])
                tap_txt = self.siglip_adapter_text(txt)
        img = img[:, :n_target]
        out = {}
        if hidden_states is not None:
            image_hidden = self.image_norm_out(img, temb)
            tokens = self.image_proj_out(image_hidden)
            p, c = self.config.patch_size, self.out_channels
            h, w = height // p, width // p
            x = tokens.reshape(tokens.shape[0], h, w, p, p, c)
            x = torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, h * p, w * p)
            out["velocity"], out["image_hidden"] = x, image_hidden
        text_hidden = self.text_norm_out(txt)
        out["text_hidden"], out["text_logits"] = text_hidden, self.text_proj_out(text_hidden)
        if tap_img is not None:
            out["tap_image"], out["tap_text"] = tap_img, tap_txt
        return out


def reference_from_config(cfg) -> UniAlignmentReference:
    """The reference model for one of our `DiTConfig`s (float32, eval mode)."""
    return UniAlignmentReference(
        vocab_size=cfg.vocab_size, sample_size=cfg.sample_size, patch_size=cfg.patch_size,
        in_channels=cfg.in_channels, num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim, out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size, timestep_dim=cfg.timestep_dim,
        timestep_fp16_round=cfg.timestep_fp16_round, num_null_tokens=cfg.num_null_tokens,
        adapter_hidden=cfg.adapter_hidden, adapter_out=cfg.adapter_out,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    ).eval()
