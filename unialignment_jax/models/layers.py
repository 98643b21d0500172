"""Small building blocks with logical axis names on every parameter.

Parameters are stored in `param_dtype` (float32 by default) and cast to the compute `dtype` at
use; normalisations and softmax statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Shape = int | Sequence[int]


def _tuple(x: Shape) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


def xavier_uniform_for(in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    """Xavier-uniform over the flattened (fan_in, fan_out) view of a multi-axis kernel."""
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class Dense(nnx.Module):
    """`y = x . W + b` contracting the trailing `len(in_features)` axes of x.

    The kernel has shape `(*in_features, *out_features)` (Flax layout: the transpose of a torch
    Linear weight, reshaped), with logical names `in_axes + out_axes`.
    """

    def __init__(
        self,
        in_features: Shape,
        out_features: Shape,
        *,
        in_axes: Sequence[str | None],
        out_axes: Sequence[str | None],
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_init=None,
        bias_init=nnx.initializers.zeros_init(),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.in_shape, self.out_shape = _tuple(in_features), _tuple(out_features)
        if len(in_axes) != len(self.in_shape) or len(out_axes) != len(self.out_shape):
            raise ValueError(f"axes {in_axes}/{out_axes} do not match shapes {self.in_shape}/{self.out_shape}")
        kernel_init = kernel_init or xavier_uniform_for(self.in_shape, self.out_shape)
        kernel_init = nnx.with_partitioning(kernel_init, tuple(in_axes) + tuple(out_axes))
        self.kernel = nnx.Param(kernel_init(rngs.params(), self.in_shape + self.out_shape, param_dtype))
        if use_bias:
            bias_init = nnx.with_partitioning(bias_init, tuple(out_axes))
            self.bias = nnx.Param(bias_init(rngs.params(), self.out_shape, param_dtype))
        else:
            self.bias = None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        kernel = self.kernel[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (diffusers `RMSNorm(elementwise_affine=True)`), used for QK-norm."""

    def __init__(self, dim: int, axis_name: str, *, eps: float = 1e-6, param_dtype=jnp.float32):
        init = nnx.with_partitioning(nnx.initializers.ones_init(), (axis_name,))
        self.weight = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (diffusers `gelu-approximate`)."""
    return jax.nn.gelu(x, approximate=True)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * (1 + scale) + shift` with per-example (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]
