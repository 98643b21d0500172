"""The pixel codec: exact space-to-depth "autoencoder" with the VAE's interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialignment_jax import config as config_lib
from unialignment_jax.models import encoders
from unialignment_jax.models.pixel_codec import PixelCodec


def pixels(shape=(2, 32, 32, 3), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_round_trip_is_exact():
    codec = PixelCodec(4)
    x = pixels()
    z = codec.encode(jnp.asarray(x))
    assert z.shape == (2, 8, 8, 48) and codec.latent_channels == 48 and codec.downsample == 4
    np.testing.assert_array_equal(np.asarray(codec.decode(z)), x)
    np.testing.assert_array_equal(np.asarray(codec.encode(jnp.asarray(x), rng=jax.random.key(0))), np.asarray(z))


def test_latent_pixel_is_its_block():
    x = pixels((1, 8, 12, 3))
    z = np.asarray(PixelCodec(4).encode(jnp.asarray(x)))
    np.testing.assert_array_equal(z[0, 1, 2], x[0, 4:8, 8:12].reshape(-1))  # (row, column, rgb) order


def test_jitted_with_scale_and_shift_still_inverts():
    codec = PixelCodec(2, shift=0.25, scale=2.0)
    x = pixels((2, 8, 8, 3))
    z = jax.jit(codec.encode)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(z[0, 0, 0, :3]), (x[0, 0, 0] - 0.25) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(codec.decode)(z)), x, atol=1e-6)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="multiples of 4"):
        PixelCodec(4).encode(jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match="48"):
        PixelCodec(4).decode(jnp.zeros((1, 8, 8, 16)))


def test_build_codec_reads_the_config():
    c = config_lib.base_config()
    c.codec.kind = "pixel"
    c.input.update(dict(resolution=32, latent_downsample=4))
    codec = encoders.build_codec(c)
    assert isinstance(codec, PixelCodec) and codec.downsample == 4 and codec.latent_channels == 48
