"""The UniAlignment MMDiT: SD3-medium's joint transformer as modified by Dual Diffusion
(docs/method.md, "Architecture").

Differences from SD3's `SD3Transformer2DModel`, all from the official `SD3JointModelFlexible`:
  * every block keeps both streams' outputs (no context-pre-only last block);
  * conditioning is the timestep only: sinusoid(256) -> Linear -> SiLU -> Linear (no pooled CLIP);
  * SD3's `norm_out`/`proj_out` become an image head (AdaLN-continuous, scale then shift, Linear to
    p*p*C, unpatchify) and a text head (LayerNorm without affine, Linear to the vocabulary);
  * text-only inputs use learned null image tokens (`null_image_embd`, 8 x width);
  * condition images (edit/perception: one, compose: several) are patch-embedded with the same
    projection and position table, appended after the target tokens, modulated by the same timestep
    embedding, and dropped before the image head;
  * alignment adapters (mean over tokens -> Linear -> SiLU -> Linear -> SiLU) read the streams at
    the output of block `block_depth` (training only).

Layout conventions: latents are NHWC; the joint sequence is [image tokens ; text tokens]. The blocks'
parameters are always stored stacked along a leading `layers` axis, so checkpoints do not depend on
`scan_layers`, which only chooses between `lax.scan` (fast compile) and an unrolled loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unialignment_jax.models import attention as attention_lib
from unialignment_jax.models import embeddings
from unialignment_jax.models.layers import (REMAT_POLICIES, Dense, RMSNorm, gelu_tanh, layer_norm, modulate,
                                            use_layer_scan)
from unialignment_jax.parallel.rules import constrain

ACT = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Model hyper-parameters; field names follow `config.model` (see experiments/*.py)."""

    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    sample_size: int = 128  # latent size SD3 built its table for: base grid = sample_size / patch
    pos_embed_max_size: int = 192
    context_dim: int = 4096  # text-encoder width (T5-XXL), `joint_attention_dim` in diffusers
    vocab_size: int = 32100
    mlp_ratio: int = 4
    timestep_dim: int = 256
    # The official TimestepProjEmbeddings casts the sinusoid to float16 before the MLP; True rounds
    # it the same way (in any compute dtype), False keeps it exact.
    timestep_fp16_round: bool = True
    num_null_tokens: int = 8
    block_depth: int = 8  # the alignment tap: output of this (1-based) block
    adapter_hidden: int = 2048
    adapter_out: int = 3584  # teacher width (Qwen2.5-VL-7B: 3584)
    qk_norm: bool = False
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "xla"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_config(cls, model_cfg: Any) -> "DiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(model_cfg).items() if k in names})


def _dtype(name: str):
    return jnp.dtype(name)


class StreamWeights(nnx.Module):
    """One stream's weights in a joint block (the image stream or the text stream)."""

    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
        d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        zeros = nnx.initializers.zeros_init()
        # AdaLN-Zero: shift, scale, gate for attention, then for the MLP; zero-initialised so that
        # a fresh block is the identity.
        self.modulation = Dense(d, (6, d), in_axes=("embed",), out_axes=(None, "modulation"),
                                kernel_init=zeros, **kw)
        self.qkv = Dense(d, (3, h, hd), in_axes=("embed",), out_axes=("qkv", "heads", "kv"), **kw)
        self.out = Dense((h, hd), d, in_axes=("heads", "kv"), out_axes=("embed",), **kw)
        self.mlp_in = Dense(d, cfg.mlp_ratio * d, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.mlp_out = Dense(cfg.mlp_ratio * d, d, in_axes=("mlp",), out_axes=("embed",), **kw)
        if cfg.qk_norm:
            self.norm_q = RMSNorm(hd, "kv", param_dtype=_dtype(cfg.param_dtype))
            self.norm_k = RMSNorm(hd, "kv", param_dtype=_dtype(cfg.param_dtype))
        else:
            self.norm_q = self.norm_k = None

    def qkv_heads(self, x_norm: jax.Array):
        qkv = constrain(self.qkv(x_norm), ("act_batch", "act_length", None, "act_heads", None))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def mlp(self, x: jax.Array) -> jax.Array:
        hidden = constrain(gelu_tanh(self.mlp_in(x)), ("act_batch", "act_length", "act_mlp"))
        return self.mlp_out(hidden)


class JointBlock(nnx.Module):
    """SD3 JointTransformerBlock with `context_pre_only=False`: both streams updated."""

    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
        self.img = StreamWeights(cfg, rngs)
        self.txt = StreamWeights(cfg, rngs)
        self.attention_impl = cfg.attention

    def __call__(self, img: jax.Array, txt: jax.Array, temb_act: jax.Array):
        n_img = img.shape[1]
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = jnp.moveaxis(self.img.modulation(temb_act), 1, 0)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = jnp.moveaxis(self.txt.modulation(temb_act), 1, 0)

        qi, ki, vi = self.img.qkv_heads(modulate(layer_norm(img), i_shift, i_scale))
        qt, kt, vt = self.txt.qkv_heads(modulate(layer_norm(txt), t_shift, t_scale))
        joint = lambda a, b: jnp.concatenate([a, b], axis=1)
        attn = attention_lib.attention(joint(qi, qt), joint(ki, kt), joint(vi, vt), self.attention_impl)
        attn = constrain(attn, ("act_batch", "act_length", "act_heads", None))

        img = img + i_gate[:, None] * self.img.out(attn[:, :n_img])
        img = img + i_gate2[:, None] * self.img.mlp(modulate(layer_norm(img), i_shift2, i_scale2))
        txt = txt + t_gate[:, None] * self.txt.out(attn[:, n_img:])
        txt = txt + t_gate2[:, None] * self.txt.mlp(modulate(layer_norm(txt), t_shift2, t_scale2))
        return constrain(img, ACT), constrain(txt, ACT)


class Adapter(nnx.Module):
    """Alignment adapter: mean over tokens -> Linear -> SiLU -> Linear -> SiLU (trailing SiLU kept)."""

    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        self.fc1 = Dense(cfg.width, cfg.adapter_hidden, in_axes=("embed",), out_axes=("adapter_mlp",), **kw)
        self.fc2 = Dense(cfg.adapter_hidden, cfg.adapter_out, in_axes=("adapter_mlp",), out_axes=("teacher",), **kw)

    def __call__(self, pooled: jax.Array) -> jax.Array:
        return jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(pooled)))).astype(jnp.float32)


class UniAlignmentDiT(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        if cfg.width % 4:
            raise ValueError(f"model width {cfg.width} must be divisible by 4 (2-D sin-cos table)")
        if not 1 <= cfg.block_depth <= cfg.num_layers:
            raise ValueError(f"model.block_depth = {cfg.block_depth} is outside 1..{cfg.num_layers}")
        self.cfg = cfg
        d, p, c = cfg.width, cfg.patch_size, cfg.in_channels
        kw = dict(rngs=rngs, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        normal = nnx.initializers.normal
        zeros = nnx.initializers.zeros_init()

        self.patch_embed = Dense((p, p, c), d, in_axes=(None, None, None), out_axes=("embed",), **kw)
        self.time_embed_1 = Dense(cfg.timestep_dim, d, in_axes=("time_freq",), out_axes=("mlp",),
                                  kernel_init=normal(0.02), **kw)
        self.time_embed_2 = Dense(d, d, in_axes=("mlp",), out_axes=("embed",), kernel_init=normal(0.02), **kw)
        self.context_embedder = Dense(cfg.context_dim, d, in_axes=("context_in",), out_axes=("embed",), **kw)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return JointBlock(cfg, r)

        self.blocks = make_blocks(rngs)

        self.image_norm_out = Dense(d, (2, d), in_axes=("embed",), out_axes=(None, "modulation"),
                                    kernel_init=zeros, **kw)  # [scale, shift]
        self.image_proj_out = Dense(d, p * p * cfg.out_channels, in_axes=("embed",), out_axes=(None,),
                                    kernel_init=zeros, **kw)
        self.text_proj_out = Dense(d, cfg.vocab_size, in_axes=("embed",), out_axes=("vocab",),
                                   kernel_init=normal(0.02), **kw)
        null_init = nnx.with_partitioning(normal(d**-0.5), (None, "null_tokens", "embed"))
        self.null_image_embd = nnx.Param(null_init(rngs.params(), (1, cfg.num_null_tokens, d),
                                                   _dtype(cfg.param_dtype)))
        self.adapter_img = Adapter(cfg, rngs)
        self.adapter_txt = Adapter(cfg, rngs)

    # ---------------------------------------------------------------------------------- inputs

    def embed_image(self, latents: jax.Array) -> jax.Array:
        """(B, H, W, C) latents -> (B, H/p * W/p, D) tokens with the cropped sin-cos table added."""
        cfg = self.cfg
        b, h, w, c = latents.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        patches = latents.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.patch_embed(patches.reshape(b, (h // p) * (w // p), p, p, c))
        pos = embeddings.cropped_pos_embed(cfg.width, cfg.pos_embed_max_size, cfg.sample_size // p, h // p, w // p)
        return (tokens + jnp.asarray(pos, tokens.dtype)[None]).astype(_dtype(cfg.dtype))

    def embed_timestep(self, timesteps: jax.Array) -> jax.Array:
        feats = embeddings.timestep_features(timesteps, self.cfg.timestep_dim)
        if self.cfg.timestep_fp16_round:
            feats = feats.astype(jnp.float16)
        return self.time_embed_2(jax.nn.silu(self.time_embed_1(feats)))

    # -------------------------------------------------------------------------------- backbone

    def run_blocks(self, img: jax.Array, txt: jax.Array, temb_act: jax.Array, n_target: int, tap: bool):
        """All joint blocks. With `tap`, also the token means of the target image tokens and of the
        text tokens at the output of block `block_depth` (the adapters' inputs)."""
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, layer_state):
            img, txt = carry
            img, txt = nnx.merge(graphdef, layer_state)(img, txt, temb_act)
            pooled = (img[:, :n_target].mean(1), txt.mean(1)) if tap else None
            return (img, txt), pooled

        policy = REMAT_POLICIES[cfg.remat]
        scan = use_layer_scan(cfg.scan_layers)
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
        if scan:
            (img, txt), pooled = jax.lax.scan(body, (img, txt), stacked)
            tapped = jax.tree.map(lambda x: x[cfg.block_depth - 1], pooled) if tap else None
        else:
            tapped = None
            for i in range(cfg.num_layers):
                (img, txt), pooled = body((img, txt), jax.tree.map(lambda x: x[i], stacked))
                if i == cfg.block_depth - 1:
                    tapped = pooled
        return img, txt, tapped

    def __call__(self, latents, context, timesteps, cond_latents=None, *, tap: bool = False):
        """One forward pass.

        Args:
          latents: (B, H, W, C) target latents (noisy for the image pass, clean at timestep 0 for
            the text pass), or None for text-only inputs (null image tokens).
          context: (B, L, context_dim) text-encoder features.
          timesteps: (B,) flow-matching timesteps in [0, 1000] (1000 * sigma).
          cond_latents: (B, K, H', W', C) clean condition latents (edit/perception K=1, compose
            K=3), or None.
          tap: also return the adapters' outputs at block `block_depth`.

        Returns a dict with `text_logits` (B, L, V), `text_hidden` (B, L, D: after the text head's
        norm), and unless text-only `velocity` (B, H, W, C_out) and `image_hidden` (B, T, D: target
        tokens after the image head's AdaLN); with `tap`, `tap_image` and `tap_text` (B, adapter_out).
        """
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        b = context.shape[0]
        if latents is None:
            img = jnp.broadcast_to(self.null_image_embd[...].astype(dt), (b,) + self.null_image_embd.shape[1:])
        else:
            img = self.embed_image(latents)
        n_target = img.shape[1]
        if cond_latents is not None:
            if latents is None:
                raise ValueError("condition images need a target image (latents is None)")
            conds = [self.embed_image(cond_latents[:, k]) for k in range(cond_latents.shape[1])]
            img = jnp.concatenate([img] + conds, axis=1)
        img = constrain(img, ACT)
        txt = constrain(self.context_embedder(context), ACT)
        temb = self.embed_timestep(timesteps)
        temb_act = jax.nn.silu(temb)

        img, txt, tapped = self.run_blocks(img, txt, temb_act, n_target, tap)

        out: dict[str, jax.Array] = {}
        text_hidden = layer_norm(txt)
        out["text_hidden"] = text_hidden.astype(jnp.float32)
        out["text_logits"] = constrain(self.text_proj_out(text_hidden), ("act_batch", "act_length", "act_vocab")
                                       ).astype(jnp.float32)
        if latents is not None:
            scale, shift = jnp.moveaxis(self.image_norm_out(temb_act), 1, 0)
            image_hidden = modulate(layer_norm(img[:, :n_target]), shift, scale)
            out["image_hidden"] = image_hidden.astype(jnp.float32)
            out["velocity"] = self.unpatchify(self.image_proj_out(image_hidden), latents.shape)
        if tap:
            pooled_img, pooled_txt = tapped
            out["tap_image"] = self.adapter_img(pooled_img)
            out["tap_text"] = self.adapter_txt(pooled_txt)
        return out

    def unpatchify(self, tokens: jax.Array, latent_shape) -> jax.Array:
        """(B, T, p*p*C) -> (B, H, W, C); the channel order (p, q, c) is diffusers' unpatchify."""
        b, h, w, _ = latent_shape
        p, c = self.cfg.patch_size, self.cfg.out_channels
        x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, c).astype(jnp.float32)
