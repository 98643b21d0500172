"""The pixel codec: an exact, parameter-free stand-in for the VAE (tiny runs, the Shapes demo).

"Encoding" is space-to-depth by a factor f: each f x f x 3 pixel block becomes one latent pixel with
3 * f * f channels, ordered (row in block, column in block, RGB) - e.g. 32 x 32 x 3 with f = 4 gives
8 x 8 x 48. Pixels in [-1, 1] are already centred on zero with unit range, so the latents are the
pixels themselves (shift 0, scale 1 by default): decoding is the exact inverse, bit for bit.
The interface is the VAE's (`encode(pixels, rng=None)`, `decode(latents)`, `downsample`,
`latent_channels`); `rng` is accepted and ignored (the "posterior" is a point mass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class PixelCodec(nnx.Module):
    def __init__(self, downsample: int, channels: int = 3, shift: float = 0.0, scale: float = 1.0):
        if downsample < 1:
            raise ValueError(f"input.latent_downsample = {downsample}: must be a positive integer")
        self.downsample = downsample
        self.channels = channels
        self.latent_channels = channels * downsample * downsample
        self.shift, self.scale = shift, scale

    def encode(self, pixels: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        del rng
        b, h, w, c = pixels.shape
        f = self.downsample
        if h % f or w % f or c != self.channels:
            raise ValueError(f"pixels of shape {pixels.shape}: need H, W multiples of {f} and {self.channels} channels")
        x = pixels.astype(jnp.float32).reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, h // f, w // f, f * f * c)
        if self.shift != 0.0 or self.scale != 1.0:
            x = (x - self.shift) * self.scale
        return x

    def decode(self, latents: jax.Array) -> jax.Array:
        b, h, w, c = latents.shape
        f = self.downsample
        if c != self.latent_channels:
            raise ValueError(f"latents with {c} channels; this codec makes {self.latent_channels}")
        x = latents.astype(jnp.float32)
        if self.shift != 0.0 or self.scale != 1.0:
            x = x / self.scale + self.shift
        x = x.reshape(b, h, w, f, f, self.channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * f, w * f, self.channels)
