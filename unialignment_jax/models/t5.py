"""The frozen T5 v1.1 encoder (HF `T5EncoderModel` with `feed_forward_proj='gated-gelu'`) in Flax NNX.

UniAlignment encodes every prompt, and re-encodes every randomly masked caption in each text pass,
with the T5-v1.1-XXL encoder (docs/method.md, "Backbone" and "Text masked diffusion"), so it runs
inside the jitted train step.

T5 v1.1, as HF computes it:
  * one shared token embedding (no scaling by sqrt(d_model));
  * pre-norm blocks with T5's RMSNorm (no mean subtraction, no bias, statistics in float32);
  * self-attention without the 1/sqrt(d_kv) scaling (T5 folds it into the initialisation), plus a
    bucketed relative position bias (bidirectional: 32 buckets, half per direction, exact up to 8
    then logarithmic up to 128) that only the first block owns and every block reuses;
  * gated-GELU feed-forward `wo(gelu_tanh(wi_0 x) * wi_1 x)` (HF `gelu_new`);
  * a final RMSNorm; no dropout (frozen, eval mode).
The official code runs it without an attention mask on EOS-padded ids: `attention_mask=None` is the
default; a (B, L) boolean mask (True = attend) is supported.

Parameter layout (the name table is `interop/t5_names.py`): the blocks are stacked along a leading
`layers` axis (applied with `lax.scan` when `scan_layers`, so T5-XXL's 24 blocks compile once);
q/k/v are fused into one (embed, 3, heads, kv) kernel and wi_0/wi_1 into one (embed, 2, mlp)
kernel. The first block's `relative_attention_bias` lives at the top level, since it is shared.

The mask token. `<extra_id_0>` (32099 for T5) has its own row, which UniAlignment overwrites with a
pretrained "aligned" vector and may train. The row is a separate parameter `mask_embedding` (d,),
stored in float32, that replaces the table's row at lookup time (`where(ids == mask_token_id, ...)`):
the (vocab, d) table stays frozen and can live in bfloat16, and a trainer that trains the mask token
selects just this one parameter (`trainable_filter`) for gradients and the optimizer. It starts as a
copy of the table's row (random init and checkpoint import both copy it), so a model without a
replacement file computes exactly what HF computes. `mask_token_id=None` disables it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unialignment_jax.models.layers import REMAT_POLICIES, Dense, RMSNorm, gelu_tanh, use_layer_scan
from unialignment_jax.parallel.rules import constrain

SIZE_FIELDS = ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size")

# Architecture presets (`text_encoder.preset`); 'custom' takes the sizes from the config keys.
PRESETS: dict[str, dict[str, int]] = {
    # google/t5-v1_1-xxl encoder, SD3's text_encoder_3 (about 4.76B parameters).
    "t5_xxl": dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=32128),
    # The demo / test encoder: byte tokenizer vocabulary (ByT5 layout, 384 ids), width 64.
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, vocab_size=384),
}

ACT = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class T5Config:
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # Random initialisation only (weights loaded from a checkpoint replace it): the std of the
    # relative-position bias table; 0 = HF's d_model**-0.5. HF's value suits pretraining, but a
    # frozen *random* stand-in (the demo's) then carries almost no position information (a bias of
    # +-0.1 barely changes the attention), so the demo raises it to give the DiT's text stream the
    # local order a pretrained T5's features carry.
    relative_attention_bias_std: float = 0.0
    mask_token_id: int | None = 32099
    scan_layers: bool = True
    remat: str = "none"
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "bfloat16"  # storage of the frozen weights (mask_embedding is always float32)

    @classmethod
    def from_config(cls, te_cfg: Any) -> "T5Config":
        """From `config.text_encoder`: the preset's sizes unless `preset == 'custom'`."""
        d = dict(te_cfg)
        preset = d.get("preset", "custom")
        if preset != "custom":
            if preset not in PRESETS:
                raise ValueError(f"text_encoder.preset = {preset!r}: choose one of {sorted(PRESETS)} or 'custom'")
            d.update(PRESETS[preset])
        if (d.get("mask_token_id") or 0) < 0:  # the config's -1: no mask row
            d["mask_token_id"] = None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, hf_config: dict, **overrides) -> "T5Config":
        """From a HF T5 `config.json` dict (sizes, buckets and epsilon); the rest from `overrides`."""
        if hf_config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ValueError(f"feed_forward_proj = {hf_config['feed_forward_proj']!r}: only T5 v1.1 "
                             "('gated-gelu') is implemented")
        keys = SIZE_FIELDS + ("relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")
        return cls(**{k: hf_config[k] for k in keys if k in hf_config}, **overrides)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(L, L) bucket of `key - query` (bidirectional), computed like HF/Mesh-TF in float32.

    Host-side numpy: the table only depends on static shapes, and float32 numpy reproduces torch's
    rounding at the log-bucket boundaries (checked against HF for L <= 2048).
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    far = np.maximum(dist, max_exact).astype(np.float32)  # the log branch is only used where dist >= max_exact
    log_ratio = np.log(far / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


def _normal_by_slice(stds: tuple[float, ...], axis: int):
    """Normal init whose std differs along `axis` (HF initialises q, k, v with different stds)."""

    def init(key, shape, dtype=jnp.float32):
        std = jnp.asarray(stds, jnp.float32).reshape([-1 if i == axis else 1 for i in range(len(shape))])
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


class T5Block(nnx.Module):
    """One encoder block: RMSNorm -> self-attention (+ shared position bias) -> RMSNorm -> gated-GELU FF."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        d, h, dk, ff = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
        pdt = jnp.dtype(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt, use_bias=False)
        normal = nnx.initializers.normal
        # Initialisation follows HF T5PreTrainedModel._init_weights (factor 1).
        self.attn_norm = RMSNorm(d, "embed", eps=cfg.layer_norm_epsilon, param_dtype=pdt)
        self.qkv = Dense(d, (3, h, dk), in_axes=("embed",), out_axes=("qkv", "heads", "kv"),
                         kernel_init=_normal_by_slice(((d * dk) ** -0.5, d**-0.5, d**-0.5), axis=1), **kw)
        self.out = Dense((h, dk), d, in_axes=("heads", "kv"), out_axes=("embed",),
                         kernel_init=normal((h * dk) ** -0.5), **kw)
        self.ff_norm = RMSNorm(d, "embed", eps=cfg.layer_norm_epsilon, param_dtype=pdt)
        self.wi = Dense(d, (2, ff), in_axes=("embed",), out_axes=(None, "mlp"), kernel_init=normal(d**-0.5), **kw)
        self.wo = Dense(ff, d, in_axes=("mlp",), out_axes=("embed",), kernel_init=normal(ff**-0.5), **kw)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        qkv = constrain(self.qkv(self.attn_norm(x)), ("act_batch", "act_length", None, "act_heads", None))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # No 1/sqrt(d_kv) scaling (T5). Logits and softmax in float32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attn = constrain(jnp.einsum("bhqk,bkhd->bqhd", probs, v), ("act_batch", "act_length", "act_heads", None))
        x = constrain(x + self.out(attn), ACT)

        hidden = self.wi(self.ff_norm(x))
        hidden = constrain(gelu_tanh(hidden[..., 0, :]) * hidden[..., 1, :], ("act_batch", "act_length", "act_mlp"))
        return constrain(x + self.wo(hidden), ACT)


class T5Encoder(nnx.Module):
    """`T5Encoder(cfg)(ids (B, L) int32, attention_mask (B, L) bool | None) -> (B, L, d_model)`."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        if cfg.mask_token_id is not None and not 0 <= cfg.mask_token_id < cfg.vocab_size:
            raise ValueError(f"mask_token_id {cfg.mask_token_id} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"text_encoder.remat = {cfg.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        self.cfg = cfg
        d, pdt = cfg.d_model, jnp.dtype(cfg.param_dtype)
        normal = nnx.initializers.normal
        embed_init = nnx.with_partitioning(normal(1.0), ("vocab", "embed"))
        self.token_embed = nnx.Param(embed_init(rngs.params(), (cfg.vocab_size, d), pdt))  # HF `shared`
        if cfg.mask_token_id is not None:
            row = self.token_embed[cfg.mask_token_id].astype(jnp.float32)
            self.mask_embedding = nnx.Param(row, out_sharding=("embed",))
        else:
            self.mask_embedding = None
        bias_init = nnx.with_partitioning(normal(cfg.relative_attention_bias_std or d**-0.5), (None, "heads"))
        self.relative_attention_bias = nnx.Param(
            bias_init(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), pdt))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return T5Block(cfg, r)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(d, "embed", eps=cfg.layer_norm_epsilon, param_dtype=pdt)

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token lookup in the compute dtype, with the mask token's row taken from `mask_embedding`."""
        dt = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.token_embed[...], ids, axis=0).astype(dt)
        if self.mask_embedding is not None:
            x = jnp.where((ids == self.cfg.mask_token_id)[..., None], self.mask_embedding[...].astype(dt), x)
        return x

    def position_bias(self, length: int) -> jax.Array:
        """(heads, L, L) float32 relative position bias, shared by every block."""
        cfg = self.cfg
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        table = self.relative_attention_bias[...].astype(jnp.float32)
        return jnp.moveaxis(jnp.take(table, jnp.asarray(buckets), axis=0), -1, 0)

    def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        ids = jnp.asarray(ids, jnp.int32)
        x = constrain(self.embed(ids), ACT)
        bias = self.position_bias(ids.shape[1])
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)

        graphdef, stacked = nnx.split(self.blocks)

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, bias, mask), None

        scan = use_layer_scan(cfg.scan_layers)
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not scan)
        if scan:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for i in range(cfg.num_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        return self.final_norm(x)


def eos_attention_mask(ids: jax.Array, eos_id: int = 1) -> jax.Array:
    """(B, L) bool: True up to and including each row's first EOS (HF's mask for EOS-padded ids);
    a row without EOS attends everywhere. For `text_encoder.use_attention_mask`."""
    ids = jnp.asarray(ids)
    is_eos = ids == eos_id
    end = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), ids.shape[1] - 1)
    return jnp.arange(ids.shape[1])[None, :] <= end[:, None]


def trainable_filter(train_mask_embedding: bool):
    """The nnx filter of the encoder's trainable parameters: the mask row, or nothing (frozen)."""
    if train_mask_embedding:
        return nnx.All(nnx.Param, nnx.PathContains("mask_embedding"))
    return nnx.Nothing


def param_count(cfg: T5Config) -> int:
    d, h, dk, ff, n = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers
    block = 2 * d + 3 * d * h * dk + h * dk * d + 2 * d * ff + ff * d
    mask = d if cfg.mask_token_id is not None else 0
    return cfg.vocab_size * d + mask + cfg.relative_attention_num_buckets * h + n * block + d
