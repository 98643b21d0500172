"""Small building blocks with logical axis names on every parameter.

Parameters are stored in `param_dtype` (float32 by default) and cast to the compute `dtype` at
use; normalisations and softmax statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Shape = int | Sequence[int]

CPU_SCAN_ENV = "UNIALIGNMENT_CPU_SCAN"


def use_layer_scan(requested: bool) -> bool:
    """Whether stacked layers run under `lax.scan` (else an unrolled loop; same parameters, same
    results), decided at trace time.

    On simulated CPU devices (the CPU backend with more than one device) the layer scan is unrolled:
    XLA:CPU then runs the FSDP all-gathers inside the while loop's body concurrently with
    collectives outside it, in an order that differs between devices, and its in-process
    collectives deadlock. Measured on 2 cores: tests/test_train_step.py hung in 7 of 7 runs with the
    scan (4 of them with XLA flags tried as fixes: xla_cpu_use_thunk_runtime=false,
    xla_cpu_multi_thread_eigen=false) and passed 5 of 5 unrolled. Compile-only tools (`inspect`, the memory plan) execute nothing
    and set UNIALIGNMENT_CPU_SCAN=1 to keep the scan; so can anyone who wants it anyway.
    """
    if not requested:
        return False
    if jax.default_backend() == "cpu" and jax.device_count() > 1 and os.environ.get(CPU_SCAN_ENV) != "1":
        if not getattr(use_layer_scan, "_warned", False):
            use_layer_scan._warned = True
            logging.getLogger(__name__).info(
                "simulated CPU devices: layer scans unrolled (XLA:CPU collective deadlock; %s=1 keeps them)",
                CPU_SCAN_ENV)
        return False
    return True


def dots_except_scores(prim, *avals, **params) -> bool:
    """Remat policy: keep every matmul output except attention scores.

    A dot is treated as producing scores when it has batch dimensions and its output is larger than
    both operands (QK^T: (b, h, q, k) from two (b, t, h, d); PV and every projection stay kept).
    Scores are the largest per-layer intermediate (b*h*T^2) and the cheapest to recompute per
    element (2 * head_dim FLOPs), so the backward pass recomputes QK^T from the kept q and k rather
    than writing the scores to the scan's residual buffer and reading them back: on the medium CPU
    step 1.04-1.06x faster than `checkpoint_dots` for 1.7% more FLOPs (docs/performance.md).
    """
    if prim is not jax.lax.dot_general_p:
        return False
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    if not lhs_batch:
        return True
    lhs, rhs = avals[0].shape, avals[1].shape
    out = (math.prod(d for i, d in enumerate(lhs) if i not in lhs_contract)
           * math.prod(d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch))
    return out <= max(math.prod(lhs), math.prod(rhs))


# `model.remat` / `text_encoder.remat`: what a scanned block keeps for its backward pass.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_except_scores": dots_except_scores,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
