"""The frozen side of a training run: tokenizer, text encoder, image codec and the empty prompt's
features, built once on the mesh and passed to every step as arguments (not baked in as constants).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unialignment_jax import paths
from unialignment_jax.models import create
from unialignment_jax.models import encoders as encoder_factories
from unialignment_jax.models.t5 import eos_attention_mask


@dataclasses.dataclass
class Frozen:
    tokenizer: Any
    text_graphdef: Any
    codec_graphdef: Any  # the codec's (both codecs are nnx modules)
    use_attention_mask: bool
    arrays: dict  # {'text': T5 state, 'codec': codec state, 'null_features': (1, L, D)}

    def text_encoder(self, text_state):
        """The text encoder as the objective wants it: ids (B, L) -> features (B, L, D)."""
        model = nnx.merge(self.text_graphdef, text_state)
        if self.use_attention_mask:
            return lambda ids: model(ids, eos_attention_mask(ids, self.tokenizer.eos_id))
        return lambda ids: model(ids)


def build_frozen(config, mesh, rules, tokenizer=None) -> Frozen:
    """tokenizer: None builds config.tokenizer (and checks it against the text encoder); benchmarks
    without the tokenizer's file pass `_AbstractTokenizer(config)`."""
    if tokenizer is None:
        tokenizer = encoder_factories.build_tokenizer(config)
        encoder_factories.check_consistency(config, tokenizer)
    text_encoder = encoder_factories.build_text_encoder(config, mesh, rules)
    codec = encoder_factories.build_codec(config, mesh, rules)
    text_graphdef, text_state = nnx.split(text_encoder)
    codec_graphdef, codec_state = nnx.split(codec)
    frozen = Frozen(tokenizer=tokenizer, text_graphdef=text_graphdef, codec_graphdef=codec_graphdef,
                    use_attention_mask=bool(config.text_encoder.use_attention_mask),
                    arrays={"text": text_state, "codec": codec_state})
    # The empty prompt (official: T5(" ") padded with EOS) replaces 10% of prompts (CFG dropout).
    # One row per batch shard: a batch of 1 cannot follow the batch-sharded activation layout.
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    ids = jnp.asarray(tokenizer.encode([" "] * shards, int(config.input.text_length)))
    with create.sharding_context(mesh, rules):
        null = jax.jit(lambda state, ids: frozen.text_encoder(state)(ids)[:1])(text_state, ids)
    frozen.arrays["null_features"] = jax.device_put(
        null.astype(jnp.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    # Block: on simulated CPU devices a resharding still in flight when the first step's
    # collectives start can deadlock XLA:CPU (docs/scaling.md, "Simulated devices").
    jax.block_until_ready(frozen.arrays)
    return frozen



def tokenizer_file_here(config) -> bool:
    """Whether the tokenizer can be built here: byte and word tokenizers always (the "shapes"
    vocabulary is built in); sentencepiece when its `tokenizer.path` (local or a URI) exists."""
    tok = config.tokenizer
    return tok.kind != "sentencepiece" or bool(tok.path and paths.exists(tok.path))


def abstract_frozen(config, mesh, rules) -> Frozen:
    """The same as `build_frozen` with ShapeDtypeStructs instead of arrays (nothing allocated):
    for AOT compiles of the train step (`inspect --compile`) at sizes that do not fit here."""
    from unialignment_jax.models.pixel_codec import PixelCodec
    from unialignment_jax.models.t5 import T5Encoder
    from unialignment_jax.models.vae import AutoencoderKL

    tokenizer = encoder_factories.build_tokenizer(config) if tokenizer_file_here(config) else _AbstractTokenizer(config)
    t5_cfg = encoder_factories.t5_config(config)
    text_graphdef, text_state = create.abstract_state(lambda: T5Encoder(t5_cfg, rngs=nnx.Rngs(0)), mesh, rules)
    if config.codec.kind == "pixel":
        codec_graphdef, codec_state = nnx.split(PixelCodec(config.input.latent_downsample))
    else:
        codec_cfg = config
        if config.codec.weights and not paths.exists(config.codec.weights):
            # No weights here: the architecture from the config keys (SD3's by default).
            codec_cfg = ml_collections.ConfigDict({"codec": dict(config.codec.to_dict(), weights="")})
        vae_cfg = encoder_factories.vae_config(codec_cfg)
        codec_graphdef, codec_state = create.abstract_state(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)),
                                                            mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    null = jax.ShapeDtypeStruct((1, int(config.input.text_length), t5_cfg.d_model), jnp.float32, sharding=replicated)
    return Frozen(tokenizer=tokenizer, text_graphdef=text_graphdef, codec_graphdef=codec_graphdef,
                  use_attention_mask=bool(config.text_encoder.use_attention_mask),
                  arrays={"text": text_state, "codec": codec_state, "null_features": null})


class _AbstractTokenizer:
    """The T5 tokenizer's ids (pad 0, eos 1, mask <extra_id_0> = 32099) without its model file, for
    compiling when `tokenizer.path` is not available here."""

    def __init__(self, config):
        self.pad_id, self.eos_id = 0, 1
        self.mask_id = int(config.text_encoder.mask_token_id)
        self.vocab_size = int(config.model.vocab_size)
        self.fill_id = self.eos_id if config.tokenizer.pad_with == "eos" else self.pad_id

    def encode(self, texts, length: int) -> np.ndarray:
        """Blank texts only (the empty prompt): EOS, then padding, as the T5 tokenizer gives."""
        if any(t.strip() for t in texts):
            raise ValueError("no tokenizer file here: only blank texts can be encoded")
        ids = np.full((len(texts), length), self.fill_id, np.int32)
        ids[:, 0] = self.eos_id
        return ids
