"""The name table: official keys and shapes, a bit-exact round trip, and mismatch errors that name
the tensor."""

import numpy as np
import pytest
from flax import nnx

from unialignment_jax.interop import convert, names
from unialignment_jax.models import create
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT

CFG = DiTConfig(num_layers=2, num_heads=2, head_dim=8, in_channels=4, out_channels=4, sample_size=8,
                pos_embed_max_size=8, context_dim=12, vocab_size=30, timestep_dim=16, block_depth=1,
                adapter_hidden=10, adapter_out=6)


@pytest.fixture(scope="module")
def params():
    model = create.build_local(lambda: UniAlignmentDiT(CFG, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def test_keys_cover_the_official_layout(params):
    sd = convert.to_official(params, CFG)
    assert "transformer_blocks.1.attn.to_add_out.weight" in sd
    assert "transformer_blocks.1.ff_context.net.2.bias" in sd  # the last block keeps its text path
    assert "transformer_blocks.0.norm1_context.linear.weight" in sd
    assert sd["transformer_blocks.1.norm1_context.linear.weight"].shape == (6 * 16, 16)
    assert sd["pos_embed.proj.weight"].shape == (16, 4, 2, 2)
    assert sd["image_norm_out.linear.weight"].shape == (32, 16)
    assert sd["text_proj_out.weight"].shape == (30, 16)
    assert sd["null_image_embd"].shape == (1, 8, 16)
    assert sd["siglip_adapter_text.fc.2.weight"].shape == (6, 10)
    assert sd[names.POS_EMBED_KEY].shape == (1, 64, 16)
    assert not any(k.startswith(("norm_out", "proj_out", "time_text_embed.text_embedder")) for k in sd)
    # Every one of our parameters is exported exactly once.
    ours = set(convert.flatten(params))
    assert ours == {r.ours for r in names.official_rows(CFG.qk_norm)}
    assert convert.expected_official_shapes(params, CFG) == {k: v.shape for k, v in sd.items()}


def test_round_trip_is_bit_exact(params):
    sd = convert.to_official(params, CFG)
    back = convert.from_official(sd, params, CFG)
    flat = convert.flatten(params)
    assert back.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(back[k], np.asarray(flat[k]), err_msg=k)


def test_mismatches_name_the_tensor(params):
    sd = convert.to_official(params, CFG)
    missing = dict(sd)
    del missing["transformer_blocks.1.attn.add_k_proj.weight"]
    with pytest.raises(convert.CheckpointMismatch, match=r"missing tensors: transformer_blocks\.1\.attn\.add_k_proj\.weight"):
        convert.from_official(missing, params, CFG, source="ckpt.safetensors")
    extra = dict(sd, **{"transformer_blocks.0.attn.to_q.lora_A": np.zeros(2, np.float32)})
    with pytest.raises(convert.CheckpointMismatch, match=r"unexpected tensors: transformer_blocks\.0\.attn\.to_q\.lora_A"):
        convert.from_official(extra, params, CFG)
    shaped = dict(sd, **{"text_proj_out.weight": np.zeros((31, 16), np.float32)})
    with pytest.raises(convert.CheckpointMismatch, match=r"text_proj_out\.weight: \(31, 16\) in ckpt, model expects \(30, 16\)"):
        convert.from_official(shaped, params, CFG, source="ckpt")
    # Allowed on request: the missing tensor is simply not returned.
    out = convert.from_official(missing, params, CFG, allow_missing=True)
    assert "blocks/txt/qkv/kernel" not in out and "blocks/img/qkv/kernel" in out
