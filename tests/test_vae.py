"""The JAX SD3-style VAE against diffusers `AutoencoderKL` (float32, 1e-4).

A tiny random AutoencoderKL with SD3's options (16 latent channels, no quant convs, shift and
scale) is written with `save_pretrained` and loaded through our importer (config.json drives the
architecture).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests.conftest import make_mesh  # noqa: E402
from unialignment_jax import config as config_lib  # noqa: E402
from unialignment_jax.interop import encoder_import  # noqa: E402
from unialignment_jax.models import encoders  # noqa: E402
from unialignment_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from unialignment_jax.parallel import rules as rules_lib  # noqa: E402

SD3_LIKE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4, layers_per_block=2,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)


def write_vae(path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**{**SD3_LIKE, **overrides}).eval()
    with torch.no_grad():  # move GroupNorm affines and zero biases away from their initial values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "sd3_like"
    return write_vae(path), str(path)


@pytest.fixture(scope="module")
def ours(vae_dir):
    return encoder_import.load_vae(vae_dir[1])


def images(seed=0):
    # One shape for all eager calls (eager ops compile per shape); non-square: H and W not mixed up.
    return np.random.default_rng(seed).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_matches_diffusers_autoencoder_kl(vae_dir, ours):
    ref, _ = vae_dir
    assert (ours.downsample, ours.latent_channels) == (2, 16)
    x = images()
    z = np.random.default_rng(1).standard_normal((2, 8, 12, 16)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(nchw(x)).latent_dist
        dec = ref.decode(nchw(z)).sample.numpy().transpose(0, 2, 3, 1)
    mean, logvar = ours.moments(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(mean), post.mean.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logvar), post.logvar.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.decode_raw(jnp.asarray(z))), dec, rtol=1e-4, atol=1e-4)

    # The codec interface: latents are (mean - shift) * scale; decode undoes the scaling first.
    latents = ours.encode(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(latents), (np.asarray(mean) - 0.0609) * 1.5305, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.decode(jnp.asarray(z))),
                               np.asarray(ours.decode_raw(jnp.asarray(z) / 1.5305 + 0.0609)), rtol=1e-5, atol=1e-5)


def test_posterior_sample_uses_the_rng(ours):
    x = jnp.asarray(images(1))
    mean, logvar = ours.moments(x)
    key = jax.random.key(3)
    want = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape) - 0.0609) * 1.5305
    np.testing.assert_allclose(np.asarray(ours.encode(x, key)), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(ours.encode(x, key)), np.asarray(ours.encode(x)))


def test_quant_convs_and_no_attention(tmp_path):
    ref = write_vae(tmp_path / "v", seed=1, use_quant_conv=True, use_post_quant_conv=True,
                    mid_block_add_attention=False, layers_per_block=1)
    ours = encoder_import.load_vae(str(tmp_path / "v"))
    x = np.random.default_rng(2).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(nchw(x)).latent_dist
        dec = ref.decode(post.mean).sample.numpy().transpose(0, 2, 3, 1)
    mean, _ = ours.moments(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(mean), post.mean.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.decode_raw(mean)), dec, rtol=1e-4, atol=1e-4)


def test_jitted_encode_on_a_mesh(vae_dir, ours):
    """On the fly in a train step: replicated VAE, batch split over (data, fsdp)."""
    mesh, rules = make_mesh(data=2, fsdp=4), rules_lib.get_rules("fsdp")
    sharded = encoder_import.load_vae(vae_dir[1], mesh, rules)
    x = np.random.default_rng(4).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
    graphdef, state = nnx.split(sharded)
    from unialignment_jax.models import create

    with create.sharding_context(mesh, rules):
        encode = jax.jit(lambda s, px, key: nnx.merge(graphdef, s).encode(px, key))
        batch = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        got = jax.block_until_ready(encode(state, batch, jax.random.key(0)))
    local = jax.jit(lambda px, key: ours.encode(px, key))(jnp.asarray(x), jax.random.key(0))
    np.testing.assert_allclose(np.asarray(got), np.asarray(local), rtol=1e-5, atol=1e-5)


def test_build_codec_from_config(vae_dir):
    _, path = vae_dir
    c = config_lib.base_config()
    c.codec.weights = path
    c.input.latent_downsample = 2
    c.codec.dtype = "float32"
    codec = encoders.build_codec(c)
    assert isinstance(codec, AutoencoderKL) and codec.cfg.block_out_channels == (8, 16)
    encoders.check_consistency(c)  # 16 latent channels = model.in_channels, downsampling 2
    c.input.latent_downsample = 8
    with pytest.raises(config_lib.ConfigError, match="input.latent_downsample"):
        encoders.check_consistency(c)
    # Without weights: the architecture keys (SD3's by default), random init.
    c2 = config_lib.base_config()
    c2.codec.update(dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4))
    vae = encoders.build_codec(c2)
    assert vae.downsample == 1 and vae.encoder.conv_out.kernel.shape == (3, 3, 8, 32)
    assert float(np.abs(np.asarray(vae.encoder.conv_in.kernel[...])).sum()) > 0
    assert VAEConfig().downsample == 8
