"""Importing encoder checkpoints: file layouts (single, sharded index, tied aliases, bf16) and clear
errors for missing, unexpected and mis-shaped tensors."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unialignment_jax.interop import encoder_import  # noqa: E402
from unialignment_jax.interop.convert import CheckpointMismatch  # noqa: E402
from unialignment_jax.interop.safetensors_io import Checkpoint, SafetensorsFile  # noqa: E402
from unialignment_jax.models.t5 import T5Config  # noqa: E402

HF_KW = dict(vocab_size=120, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
CFG = T5Config(d_model=16, num_layers=2, num_heads=4, d_kv=4, d_ff=24, vocab_size=120, mask_token_id=119,
               dtype="float32", param_dtype="float32")
WO = "encoder.block.1.layer.1.DenseReluDense.wo.weight"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**HF_KW)).eval()
    path = tmp_path_factory.mktemp("t5") / "single"
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


def tensors(path):
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    return {k: np.array(f.array(k)) for k in f.keys()}


def rewrite(tmp_path, state, name="ckpt"):
    """A checkpoint directory holding `state` as model.safetensors (no config.json)."""
    d = tmp_path / name
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    return str(d)


def forward(model):
    ids = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) % 120)
    return np.asarray(model(ids))


def test_sharded_index_and_single_file_agree(t5_dir, tmp_path):
    hf, path = t5_dir
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="4KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    want = forward(encoder_import.load_t5(path, CFG))
    np.testing.assert_array_equal(forward(encoder_import.load_t5(str(tmp_path / "sharded"), CFG)), want)
    # Pointing at the single file, or at the index json, works too.
    np.testing.assert_array_equal(forward(encoder_import.load_t5(os.path.join(path, "model.safetensors"), CFG)), want)
    index = str(tmp_path / "sharded" / "model.safetensors.index.json")
    np.testing.assert_array_equal(forward(encoder_import.load_t5(index, CFG)), want)


def test_tied_alias_bf16_and_decoder_tensors(t5_dir, tmp_path):
    _, path = t5_dir
    state = tensors(path)
    # Only the tied copy of the embedding, bfloat16 storage, plus decoder tensors of a full T5.
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((16, 16), np.float32)
    state["lm_head.weight"] = np.zeros((120, 16), np.float32)
    got = encoder_import.load_t5(rewrite(tmp_path, state), CFG)
    want = encoder_import.load_t5(path, CFG)
    np.testing.assert_array_equal(np.asarray(got.token_embed[...]),
                                  np.asarray(want.token_embed[...]).astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got.mask_embedding[...]), np.asarray(got.token_embed[119]))


def test_missing_tensor_is_named(t5_dir, tmp_path):
    state = tensors(t5_dir[1])
    del state[WO]
    with pytest.raises(CheckpointMismatch, match=r"missing tensors: .*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        encoder_import.load_t5(rewrite(tmp_path, state), CFG)


def test_unexpected_tensor_is_named_with_its_file(t5_dir, tmp_path):
    state = tensors(t5_dir[1])
    state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((4,), np.float32)
    path = rewrite(tmp_path, state)
    with pytest.raises(CheckpointMismatch) as err:
        encoder_import.load_t5(path, CFG)
    msg = str(err.value)
    assert "unexpected tensors: encoder.block.0.layer.0.SelfAttention.extra.weight" in msg
    assert os.path.join(path, "model.safetensors") in msg


def test_misshaped_tensor_is_named(t5_dir, tmp_path):
    state = tensors(t5_dir[1])
    state[WO] = np.zeros((16, 20), np.float32)
    with pytest.raises(CheckpointMismatch, match=r"mis-shaped tensors: encoder\.block\.1\.layer\.1\.DenseReluDense"
                                                 r"\.wo\.weight: \[16, 20\] in .*model\.safetensors, the model "
                                                 r"expects \[16, 24\]"):
        encoder_import.load_t5(rewrite(tmp_path, state), CFG)


def test_more_layers_than_the_model_is_an_error(t5_dir, tmp_path):
    one_layer = T5Config(**{**CFG.__dict__, "num_layers": 1})
    with pytest.raises(CheckpointMismatch, match=r"config\.json .*num_layers = 2 \(ours 1\)"):
        encoder_import.load_t5(t5_dir[1], one_layer)
    with pytest.raises(CheckpointMismatch, match=r"unexpected tensors: encoder\.block\.1\."):  # no config.json
        encoder_import.load_t5(rewrite(tmp_path, tensors(t5_dir[1])), one_layer)


def test_config_json_mismatch_is_named(t5_dir):
    with pytest.raises(CheckpointMismatch, match=r"config\.json .*layer_norm_epsilon"):
        encoder_import.load_t5(t5_dir[1], T5Config(**{**CFG.__dict__, "layer_norm_epsilon": 1e-5}))


def test_broken_files_are_clear_errors(t5_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Checkpoint(str(tmp_path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="bad.safetensors"):
        Checkpoint(str(bad))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"shared.weight": "model-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shared.weight"):
        Checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="mask.npy"):
        np.save(tmp_path / "mask.npy", np.zeros(15, np.float32))
        encoder_import.read_mask_embedding(str(tmp_path / "mask.npy"), 16)
    save_file({"mask_token_emb": np.ones((1, 16), np.float32)}, str(tmp_path / "mask.safetensors"))
    np.testing.assert_array_equal(encoder_import.read_mask_embedding(str(tmp_path / "mask.safetensors"), 16), 1.0)


def test_vae_checkpoint_errors_name_the_tensor(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=16, norm_num_groups=4,
                                  layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    f = SafetensorsFile(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    state = {k: np.array(f.array(k)) for k in f.keys()}
    key = "decoder.mid_block.attentions.0.to_out.0.weight"
    state[key] = np.zeros((8, 4), np.float32)
    del state["encoder.conv_out.bias"]
    (tmp_path / "broken").mkdir()
    save_file(state, str(tmp_path / "broken" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "vae" / "config.json").read_text())
    with pytest.raises(CheckpointMismatch) as err:
        encoder_import.load_vae(str(tmp_path / "broken"))
    assert "missing tensors: encoder.conv_out.bias" in str(err.value)
    assert f"{key}: [8, 4]" in str(err.value)
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    cfg["latents_mean"] = [0.0] * 16
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match="latents_mean"):
        encoder_import.load_vae(str(tmp_path / "vae"))
