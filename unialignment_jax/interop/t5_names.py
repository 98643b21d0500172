"""The T5 name table: our `T5Encoder` parameter paths <-> HF `T5EncoderModel` state-dict keys.

HF keys (transformers 5.x; checked against `save_pretrained`):
  shared.weight                                           (vocab, d)  the token embedding
  encoder.embed_tokens.weight                             tied copy of shared.weight; some files hold
                                                          only this one, some both, some only shared
  encoder.block.{i}.layer.0.layer_norm.weight             (d,)
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight  (heads * d_kv, d)
  encoder.block.{i}.layer.0.SelfAttention.o.weight        (d, heads * d_kv)
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   (buckets, heads), block 0 only
  encoder.block.{i}.layer.1.layer_norm.weight             (d,)
  encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1}.weight            (d_ff, d)
  encoder.block.{i}.layer.1.DenseReluDense.wo.weight      (d, d_ff)
  encoder.final_layer_norm.weight                         (d,)

Our fused kernels: `blocks/qkv/kernel` (layers, d, 3, heads, d_kv) = [q | k | v], `blocks/wi/kernel`
(layers, d, 2, d_ff) = [wi_0 | wi_1]. `mask_embedding` has no row: the importer copies row
`mask_token_id` of `shared.weight` into it (then a mask-embedding file may replace it).

A full T5ForConditionalGeneration checkpoint (encoder + decoder) also loads: its `decoder.*` and
`lm_head.*` tensors are skipped, as HF's T5EncoderModel skips them.
"""

from __future__ import annotations

from unialignment_jax.interop.names import Row

EMBED_KEY = "shared.weight"
TIED_ALIASES = {EMBED_KEY: ("encoder.embed_tokens.weight",)}
IGNORED_PREFIXES = ("decoder.", "lm_head.")


def t5_rows() -> list[Row]:
    """Every parameter of `T5Encoder` except `mask_embedding`, in HF state-dict order."""
    b = "encoder.block.{i}.layer."
    attn = b + "0.SelfAttention."
    ff = b + "1.DenseReluDense."
    return [
        Row("token_embed", (EMBED_KEY,), "copy"),
        Row("relative_attention_bias", ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), "copy"),
        Row("blocks/attn_norm/weight", (b + "0.layer_norm.weight",), "copy", per_layer=True),
        Row("blocks/qkv/kernel", (attn + "q.weight", attn + "k.weight", attn + "v.weight"), "split_kernel", per_layer=True),
        Row("blocks/out/kernel", (attn + "o.weight",), "kernel", per_layer=True, n_in=2),
        Row("blocks/ff_norm/weight", (b + "1.layer_norm.weight",), "copy", per_layer=True),
        Row("blocks/wi/kernel", (ff + "wi_0.weight", ff + "wi_1.weight"), "split_kernel", per_layer=True),
        Row("blocks/wo/kernel", (ff + "wo.weight",), "kernel", per_layer=True),
        Row("final_norm/weight", ("encoder.final_layer_norm.weight",), "copy"),
    ]
