"""The SD3 VAE: diffusers `AutoencoderKL` in Flax NNX, NHWC, frozen.

UniAlignment trains and samples in SD3 VAE latents (docs/method.md, "Backbone"): 8x downsampling, 16 channels,
latent = (posterior sample - shift_factor) * scaling_factor with 0.0609 / 1.5305. `encode` runs
inside jitted train steps (on-the-fly latents, `rng` given = a posterior sample, None = its mean) and
in data preparation (precomputed latents); `decode` turns sampled latents back into pixels.

The layout is diffusers' (autoencoders/vae.py, unets/unet_2d_blocks.py, resnet.py): an Encoder
(conv_in; per level a DownEncoderBlock2D of `layers_per_block` ResnetBlock2Ds and, except at the last
level, a stride-2 conv on the input padded by (0, 1) at the bottom/right; a mid block resnet ->
single-head attention -> resnet; GroupNorm, SiLU, conv_out to 2 * latent channels) and a mirrored
Decoder (UpDecoderBlock2Ds of `layers_per_block + 1` resnets, nearest x2 upsampling then a conv).
GroupNorms use eps 1e-6; statistics and the attention softmax are computed in float32. SD3 has no
quant_conv / post_quant_conv; both are supported for other AutoencoderKL checkpoints.

Parameter paths mirror diffusers' module names ('/' for '.'; `to_out.0` is `to_out`; norms hold
`scale`/`bias`, convs and linears `kernel`/`bias`), so the name table (`interop/vae_names.py`) reads
line by line against the state dict. The VAE (84M parameters at SD3 size) is replicated: its
parameters carry no mesh axis, and its activations are split over the batch only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unialignment_jax.models.layers import Dense
from unialignment_jax.parallel.rules import constrain

IMAGE = ("act_batch", None, None, None)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_config(cls, codec_cfg: Any) -> "VAEConfig":
        """From `config.codec` (architecture keys, scaling/shift, dtype)."""
        d = dict(codec_cfg)
        d["block_out_channels"] = tuple(d.get("block_out_channels", cls.block_out_channels))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_diffusers(cls, cfg: dict, **overrides) -> "VAEConfig":
        """From a diffusers AutoencoderKL `config.json` dict; raises on options we do not implement."""
        n = len(cfg.get("block_out_channels", (64,)))
        checks = {
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu",
        }
        for key, want in checks.items():
            got = cfg.get(key, want)
            if (list(got) if isinstance(got, (list, tuple)) else got) != want:
                raise ValueError(f"AutoencoderKL config {key} = {got!r}: only {want!r} is implemented")
        for key in ("latents_mean", "latents_std"):
            if cfg.get(key) is not None:
                raise ValueError(f"AutoencoderKL config {key} is set: per-channel latent normalisation is not implemented")
        values = dict(
            in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=cfg.get("layers_per_block", 1), latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32), use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            scaling_factor=cfg.get("scaling_factor", 0.18215), shift_factor=cfg.get("shift_factor") or 0.0,
        )
        values.update(overrides)
        return cls(**values)


class Conv(nnx.Module):
    """2-D convolution, NHWC input, kernel (kh, kw, in, out) (torch (out, in, kh, kw) transposed)."""

    def __init__(self, cin: int, cout: int, size: int, *, rngs: nnx.Rngs, stride: int = 1,
                 padding: Sequence[tuple[int, int]] | None = None, dtype=jnp.float32, param_dtype=jnp.float32):
        # Random init only matters for tests and weightless runs (real weights are imported).
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        self.kernel = nnx.Param(init(rngs.params(), (size, size, cin, cout), param_dtype), out_sharding=(None,) * 4)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=(None,))
        self.stride = stride
        self.padding = tuple(padding) if padding is not None else ((size // 2, size // 2),) * 2
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch GroupNorm (affine) over NHWC: statistics per (example, group) over H, W and the group's channels."""

    def __init__(self, groups: int, channels: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=(None,))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=(None,))
        self.groups, self.eps = groups, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = xf.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _kw(cfg: VAEConfig, rngs: nnx.Rngs) -> dict:
    return dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without a time embedding: x + conv2(silu(gn2(conv1(silu(gn1(x))))))."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.norm1 = GroupNorm(cfg.norm_num_groups, cin, param_dtype=pdt)
        self.conv1 = Conv(cin, cout, 3, **_kw(cfg, rngs))
        self.norm2 = GroupNorm(cfg.norm_num_groups, cout, param_dtype=pdt)
        self.conv2 = Conv(cout, cout, 3, **_kw(cfg, rngs))
        self.conv_shortcut = Conv(cin, cout, 1, **_kw(cfg, rngs)) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return constrain(skip + h, IMAGE)


class Attention(nnx.Module):
    """The mid block's single-head self-attention over all pixels, with GroupNorm and a residual."""

    def __init__(self, cfg: VAEConfig, channels: int, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(cfg.norm_num_groups, channels, param_dtype=jnp.dtype(cfg.param_dtype))
        dense = lambda: Dense(channels, channels, in_axes=(None,), out_axes=(None,), **_kw(cfg, rngs))
        self.to_q, self.to_k, self.to_v, self.to_out = dense(), dense(), dense(), dense()

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nnx.Module):
    """UNetMidBlock2D: resnet, then (attention, resnet)."""

    def __init__(self, cfg: VAEConfig, channels: int, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cfg, channels, channels, rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(cfg, channels, rngs)] if cfg.mid_block_add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then (except at the last level) a stride-2 conv padded (0, 1)."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, add_downsample: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cfg, cin if i == 0 else cout, cout, rngs)
                                 for i in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List(
            [Conv(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), **_kw(cfg, rngs))] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpBlock(nnx.Module):
    """UpDecoderBlock2D: layers_per_block + 1 resnets, then (except at the last level) nearest x2 + conv."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, add_upsample: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cfg, cin if i == 0 else cout, cout, rngs)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Conv(cout, cout, 3, **_kw(cfg, rngs))] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        self.conv_in = Conv(cfg.in_channels, ch[0], 3, **_kw(cfg, rngs))
        self.down_blocks = nnx.List([
            DownBlock(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, rngs) for i in range(len(ch))])
        self.mid_block = MidBlock(cfg, ch[-1], rngs)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], param_dtype=jnp.dtype(cfg.param_dtype))
        self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, 3, **_kw(cfg, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        ch = tuple(reversed(cfg.block_out_channels))
        self.conv_in = Conv(cfg.latent_channels, ch[0], 3, **_kw(cfg, rngs))
        self.mid_block = MidBlock(cfg, ch[0], rngs)
        self.up_blocks = nnx.List([
            UpBlock(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, rngs) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], param_dtype=jnp.dtype(cfg.param_dtype))
        self.conv_out = Conv(ch[-1], cfg.out_channels, 3, **_kw(cfg, rngs))

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The codec interface: `encode(pixels, rng=None) -> latents`, `decode(latents) -> pixels`.

    pixels: (B, H, W, 3) in [-1, 1], H and W multiples of `downsample`; latents:
    (B, H/f, W/f, latent_channels), already shifted and scaled. Outputs are float32.
    """

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        c = cfg.latent_channels
        self.quant_conv = Conv(2 * c, 2 * c, 1, **_kw(cfg, rngs)) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(c, c, 1, **_kw(cfg, rngs)) if cfg.use_post_quant_conv else None
        self.downsample = cfg.downsample
        self.latent_channels = c

    def moments(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior's (mean, logvar), unscaled, float32 (diffusers `latent_dist.mean/.logvar`)."""
        _, h, w, _ = pixels.shape
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the VAE's downsampling {self.downsample}")
        x = constrain(pixels.astype(jnp.dtype(self.cfg.dtype)), IMAGE)
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, pixels: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Shifted and scaled latents: the posterior mean (rng None) or a sample. No gradient flows back."""
        mean, logvar = self.moments(pixels)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
        return jax.lax.stop_gradient((z - self.cfg.shift_factor) * self.cfg.scaling_factor)

    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Unscaled latents -> pixels (diffusers `decode(z).sample`)."""
        z = constrain(z.astype(jnp.dtype(self.cfg.dtype)), IMAGE)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.decode_raw(latents / self.cfg.scaling_factor + self.cfg.shift_factor)
