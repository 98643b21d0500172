"""Factories for the frozen encoders from a config: text encoder, tokenizer, image codec.

Config keys read:
  text_encoder.*   preset | sizes, relative-attention buckets, layer_norm_epsilon, mask_token_id,
                   weights, mask_embedding, train_mask_embedding, scan_layers, remat, dtype, param_dtype
                   (use_attention_mask is the caller's: pass `eos_attention_mask(ids)` when it is set)
  tokenizer.*      kind, path, pad_with
  codec.*          kind, weights, scaling_factor, shift_factor, VAE architecture keys, dtype
  input.latent_downsample (the pixel codec's factor; checked against the VAE's)
  model.context_dim, model.vocab_size, model.in_channels (consistency checks)
  seed             random initialisation of weightless encoders
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from flax import nnx

from unialignment_jax.config import NO_MASK_EMBEDDING, ConfigError, mask_embedding_file
from unialignment_jax.data import tokenizers
from unialignment_jax.models import create
from unialignment_jax.models.pixel_codec import PixelCodec
from unialignment_jax.models.t5 import T5Config, T5Encoder, trainable_filter
from unialignment_jax.models.vae import AutoencoderKL, VAEConfig


def _create(make, mesh=None, rules=None) -> nnx.Module:
    """Random init in one jitted program (eager init compiles one program per parameter shape:
    seconds for the VAE's many small convs); on the mesh's shardings, or the first device."""
    if mesh is not None:
        return create.create_sharded(make, mesh, rules)
    from unialignment_jax.interop.streaming import abstract_model

    graphdef, abstract = abstract_model(make)
    with nnx.use_eager_sharding(False):
        state = jax.jit(lambda: nnx.state(make()), out_shardings=jax.tree.map(lambda s: s.sharding, abstract))()
    return nnx.merge(graphdef, state)


def t5_config(config: Any) -> T5Config:
    return T5Config.from_config(config.text_encoder)


def vae_config(config: Any) -> VAEConfig:
    """The VAE's architecture: the weights directory's config.json if given, else `codec.*`."""
    cd = config.codec
    overrides = dict(scaling_factor=cd.scaling_factor, shift_factor=cd.shift_factor, dtype=cd.dtype,
                     param_dtype=cd.dtype)
    if cd.weights:
        from unialignment_jax.interop.encoder_import import vae_config_from_dir

        cfg = vae_config_from_dir(cd.weights)
        for key in ("scaling_factor", "shift_factor"):
            if abs(getattr(cfg, key) - overrides[key]) > 1e-9:
                logging.warning("codec.%s = %s differs from %s/config.json (%s); using codec.%s",
                                key, overrides[key], cd.weights, getattr(cfg, key), key)
        return dataclasses.replace(cfg, **overrides)
    return VAEConfig.from_config({**dict(cd), **overrides})


def build_tokenizer(config: Any) -> tokenizers.Tokenizer:
    try:
        return tokenizers.build_tokenizer(config.tokenizer)
    except ValueError as e:
        raise ConfigError(f"config.{e}" if str(e).startswith("tokenizer.") else str(e)) from None


def check_consistency(config: Any, tokenizer: tokenizers.Tokenizer | None = None) -> None:
    """The encoders against each other and against the DiT; raises ConfigError naming the keys."""
    t5 = t5_config(config)
    m = config.model
    if t5.d_model != m.context_dim:
        raise ConfigError(f"config.model.context_dim = {m.context_dim}: must equal the text encoder width "
                          f"(text_encoder d_model = {t5.d_model}, preset {config.text_encoder.preset!r})")
    if tokenizer is not None:
        if tokenizer.vocab_size > t5.vocab_size:
            raise ConfigError(f"config.text_encoder.vocab_size = {t5.vocab_size}: smaller than the tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size})")
        if m.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"config.model.vocab_size = {m.vocab_size}: the text head must cover the tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size}, tokenizer.kind {config.tokenizer.kind!r})")
        if t5.mask_token_id is not None and t5.mask_token_id != tokenizer.mask_id:
            raise ConfigError(f"config.text_encoder.mask_token_id = {t5.mask_token_id}: the tokenizer's "
                              f"<extra_id_0> is {tokenizer.mask_id}")
    f = config.input.latent_downsample
    if config.codec.kind == "pixel":
        channels = 3 * f * f
        what = f"the pixel codec with input.latent_downsample = {f} makes {channels} channels"
    else:
        vae = vae_config(config)
        if vae.downsample != f:
            raise ConfigError(f"config.input.latent_downsample = {f}: the VAE downsamples by {vae.downsample}")
        channels, what = vae.latent_channels, f"the VAE makes {vae.latent_channels} latent channels"
    for key in ("in_channels", "out_channels"):
        if m[key] != channels:
            raise ConfigError(f"config.model.{key} = {m[key]}: {what}")


def read_mask_row(config: Any):
    """The `text_encoder.mask_embedding` row ((d_model,) float32), or None ("" or "none")."""
    from unialignment_jax.interop import encoder_import

    path = mask_embedding_file(config.text_encoder)
    if not path:
        return None
    try:
        return encoder_import.read_mask_embedding(path, t5_config(config).d_model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.{e}" if str(e).startswith("text_encoder.") else str(e)) from None


def check_mask_embedding(config: Any) -> None:
    """Before a run starts (`train`, exit 2): the MASK row is chosen and readable. Pretrained T5
    (`text_encoder.weights` set) with a mask row (mask_token_id >= 0) needs `mask_embedding` = a
    file (read here: it exists, at the T5 width) or "none" (the stock row on purpose)."""
    te = config.text_encoder
    if te.weights and te.mask_token_id >= 0 and not te.mask_embedding:
        raise ConfigError(
            "config.text_encoder.mask_embedding = '': text_encoder.weights loads pretrained T5, whose stock "
            f"row {te.mask_token_id} is not the aligned MASK row the official training writes there. Convert the "
            "official checkpoint/mask_token_emb.00-of-01.pth once (unialignment convert-mask --source FILE.pth "
            "--out weights/mask_token_emb.safetensors) and set text_encoder.mask_embedding to it, or set "
            f"text_encoder.mask_embedding={NO_MASK_EMBEDDING} to train with the stock row on purpose")
    read_mask_row(config)


def build_text_encoder(config: Any, mesh=None, rules=None) -> T5Encoder:
    """The T5 encoder on the mesh's shardings (on one device without a mesh): random init, or
    `text_encoder.weights` streamed in; then the `text_encoder.mask_embedding` row, if a file is given."""
    from unialignment_jax.interop import encoder_import

    te = config.text_encoder
    cfg = t5_config(config)
    if te.weights:
        model = encoder_import.load_t5(te.weights, cfg, mesh, rules)
    else:
        model = _create(lambda: T5Encoder(cfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
    row = read_mask_row(config)
    if row is not None:
        encoder_import.set_mask_embedding(model, row)
    return model


def text_encoder_trainable(config: Any):
    """nnx filter of what the trainer may update in the text encoder (the mask row, or nothing)."""
    return trainable_filter(bool(config.text_encoder.train_mask_embedding))


def build_codec(config: Any, mesh=None, rules=None) -> AutoencoderKL | PixelCodec:
    """`codec.kind`: 'pixel' (space-to-depth by input.latent_downsample) or 'vae' (random init, or
    the diffusers directory `codec.weights`), replicated on the mesh."""
    if config.codec.kind == "pixel":
        return PixelCodec(config.input.latent_downsample)
    if config.codec.kind != "vae":
        raise ConfigError(f"config.codec.kind = {config.codec.kind!r}: choose 'vae' or 'pixel'")
    cd = config.codec
    if cd.weights:
        from unialignment_jax.interop.encoder_import import load_vae

        cfg = vae_config(config)
        return load_vae(cd.weights, mesh, rules, scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor,
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    cfg = vae_config(config)
    # A weightless VAE only serves smoke runs and benchmarks. Its ~140 small tensors are drawn with
    # an 'rbg' key: XLA compiles threefry's per-tensor bit generators many times slower.
    key = jax.random.key(config.seed, impl="rbg")
    return _create(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(key)), mesh, rules)
