"""The JAX T5 encoder against HF `T5EncoderModel` (float32, 1e-5), its mask row, and FSDP sharding.

The HF model is a tiny random T5 v1.1 (gated-GELU) written with `save_pretrained` (safetensors) and
loaded through our importer, so these tests also cover the name table.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import make_mesh  # noqa: E402
from unialignment_jax import config as config_lib  # noqa: E402
from unialignment_jax.interop import encoder_import  # noqa: E402
from unialignment_jax.models import create, encoders  # noqa: E402
from unialignment_jax.models.t5 import (T5Config, T5Encoder, eos_attention_mask, param_count,  # noqa: E402
                                        relative_position_buckets, trainable_filter)
from unialignment_jax.parallel import rules as rules_lib  # noqa: E402

VOCAB, MASK_ID = 300, 299
HF_KW = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
             feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
CFG = T5Config(d_model=32, num_layers=3, num_heads=4, d_kv=8, d_ff=48, vocab_size=VOCAB, mask_token_id=MASK_ID,
               dtype="float32", param_dtype="float32")


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**HF_KW)).eval()
    path = tmp_path_factory.mktemp("t5") / "hf"
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


def inputs(batch=2, length=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length)).astype(np.int32)
    ids[0, 5] = MASK_ID
    mask = np.ones((batch, length), bool)
    mask[1, 23:] = False
    return ids, mask


def hf_forward(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=None if mask is None else torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy()


def test_relative_position_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 300
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for buckets, distance in [(32, 128), (32, 20), (16, 64)]:
        want = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(length, buckets, distance), want)


@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_hf_t5_encoder(hf_checkpoint, with_mask):
    hf, path = hf_checkpoint
    assert T5Config.from_hf(hf.config.to_dict(), mask_token_id=MASK_ID, dtype="float32", param_dtype="float32") == CFG
    ours = encoder_import.load_t5(path, CFG)
    ids, mask = inputs()
    mask = mask if with_mask else None
    got = np.asarray(ours(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))
    want = hf_forward(hf, ids, mask)
    assert got.shape == (2, 40, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unrolled_layers_equal_scan(hf_checkpoint):
    _, path = hf_checkpoint
    ids, _ = inputs()
    scanned = encoder_import.load_t5(path, CFG)(jnp.asarray(ids))
    unrolled = encoder_import.load_t5(path, T5Config(**{**CFG.__dict__, "scan_layers": False}))(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), rtol=1e-5, atol=1e-5)


def test_mask_embedding_file_replaces_the_row(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint
    ours = encoder_import.load_t5(path, CFG)
    row = np.random.default_rng(1).standard_normal(32).astype(np.float32)
    np.save(tmp_path / "mask.npy", row[None])
    encoder_import.set_mask_embedding(ours, encoder_import.read_mask_embedding(str(tmp_path / "mask.npy"), 32))
    ids, _ = inputs()
    original = hf.shared.weight[MASK_ID].clone()
    with torch.no_grad():
        hf.shared.weight[MASK_ID] = torch.from_numpy(row)  # encoder.embed_tokens is the same tensor
    try:
        want = hf_forward(hf, ids)
    finally:
        with torch.no_grad():
            hf.shared.weight[MASK_ID] = original
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), want, rtol=1e-5, atol=1e-5)
    # The frozen table is untouched: the row lives in its own parameter.
    assert not np.allclose(np.asarray(ours.token_embed[MASK_ID]), row)


def test_only_the_mask_row_is_trainable(hf_checkpoint):
    _, path = hf_checkpoint
    model = encoder_import.load_t5(path, CFG)
    assert not nnx.state(model, trainable_filter(False))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(True), ...)
    assert list(nnx.to_pure_dict(trainable)) == ["mask_embedding"]
    ids, _ = inputs()

    grad = jax.jit(jax.grad(lambda t, i: jnp.mean(nnx.merge(graphdef, t, frozen)(i) ** 2)))
    g = nnx.to_pure_dict(grad(trainable, jnp.asarray(ids)))["mask_embedding"]
    assert g.shape == (32,) and float(jnp.abs(g).sum()) > 0
    no_mask = np.where(ids == MASK_ID, 3, ids)
    g0 = nnx.to_pure_dict(grad(trainable, jnp.asarray(no_mask)))["mask_embedding"]
    assert float(jnp.abs(g0).sum()) == 0  # the row only matters where the mask token is


def test_t5_xxl_preset_size():
    """T5-v1.1-XXL's encoder: 4.76B parameters (counted on abstract shapes; nothing is allocated)."""
    cfg = T5Config.from_config(config_lib.base_config().text_encoder)
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.vocab_size) == (4096, 24, 64, 10240, 32128)
    abstract = nnx.eval_shape(lambda: create.build_local(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0))))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    assert n == param_count(cfg) and abs(n - 4.762e9) < 0.01e9


def test_eos_attention_mask():
    ids = jnp.array([[5, 6, 1, 1, 1], [5, 1, 7, 1, 1], [5, 6, 7, 8, 9]])
    want = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(eos_attention_mask(ids)), want)


def test_fsdp_sharded_t5_matches_unsharded(hf_checkpoint):
    _, path = hf_checkpoint
    mesh = make_mesh(data=2, fsdp=4)
    rules = rules_lib.get_rules("fsdp")
    local = encoder_import.load_t5(path, CFG)
    sharded = encoder_import.load_t5(path, CFG, mesh, rules)
    spec = nnx.state(sharded)["blocks"]["qkv"]["kernel"][...].sharding.spec
    assert spec[1] == "fsdp" and spec[0] is None  # embed over fsdp, the layer axis never sharded
    assert nnx.state(sharded)["token_embed"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")

    ids, mask = inputs(batch=8, length=24, seed=3)
    graphdef, state = nnx.split(sharded)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with create.sharding_context(mesh, rules):
        run = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
        got = run(state, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
        got = jax.block_until_ready(got)
    want = local(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The demo's encoder values: tiny T5 preset, byte tokenizer, pixel codec."""
    c = config_lib.base_config()
    c.model.update(dict(context_dim=64, vocab_size=384, in_channels=48, out_channels=48, sample_size=8,
                        pos_embed_max_size=12))
    c.input.update(dict(resolution=32, latent_downsample=4))
    c.text_encoder.update(dict(preset="tiny", mask_token_id=259, dtype="float32", param_dtype="float32"))
    c.tokenizer.kind = "byte"
    c.codec.kind = "pixel"
    for k, v in overrides.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def test_build_text_encoder_from_the_tiny_config():
    c = tiny_config()
    config_lib.validate(c)
    tok = encoders.build_tokenizer(c)
    encoders.check_consistency(c, tok)
    mesh = make_mesh(data=2, fsdp=4)
    model = encoders.build_text_encoder(c, mesh, rules_lib.get_rules("fsdp"))
    assert model.cfg.d_model == 64 and model.cfg.vocab_size == 384 and model.cfg.mask_token_id == tok.mask_id
    # Random init: the mask row starts as a copy of the table's row (what HF would compute).
    np.testing.assert_array_equal(np.asarray(model.mask_embedding[...]), np.asarray(model.token_embed[259]))
    assert model.token_embed[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    ids = tok.encode(["a red circle <extra_id_0>", "move it up"] * 4, 16)
    with create.sharding_context(mesh, rules_lib.get_rules("fsdp")):
        graphdef, state = nnx.split(model)
        out = jax.block_until_ready(jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, jnp.asarray(ids)))
    assert out.shape == (8, 16, 64) and np.isfinite(np.asarray(out)).all()


def test_config_errors_name_the_key():
    c = tiny_config(**{"text_encoder.mask_token_id": 32099})
    with pytest.raises(config_lib.ConfigError, match="text_encoder.mask_token_id"):
        config_lib.validate(c)
    c = tiny_config(**{"text_encoder.d_model": 96})
    with pytest.raises(config_lib.ConfigError, match="text_encoder.d_model"):
        config_lib.validate(c)
    c = tiny_config(**{"model.context_dim": 96})
    with pytest.raises(config_lib.ConfigError, match="model.context_dim"):
        encoders.check_consistency(c)
    c = tiny_config(**{"model.in_channels": 16})
    with pytest.raises(config_lib.ConfigError, match="model.in_channels"):
        encoders.check_consistency(c)
    c = tiny_config(**{"text_encoder.mask_token_id": 300})
    with pytest.raises(config_lib.ConfigError, match="text_encoder.mask_token_id"):
        encoders.check_consistency(c, encoders.build_tokenizer(c))


def test_bfloat16_runs_close_to_float32(hf_checkpoint):
    _, path = hf_checkpoint
    ids, _ = inputs()
    f32 = encoder_import.load_t5(path, CFG)(jnp.asarray(ids))
    bf16 = encoder_import.load_t5(path, T5Config(**{**CFG.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"}))
    out = bf16(jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(f32), atol=0.1, rtol=0.05)
