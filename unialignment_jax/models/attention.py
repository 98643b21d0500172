"""Full (non-causal) multi-head attention with interchangeable implementations.

`model.attention` selects one:
  xla        einsum + float32 softmax; runs everywhere (the default, and the CPU path)
  cudnn      cuDNN fused attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16 only)
  tpu_flash  the Pallas TPU flash-attention kernel, run per shard with `shard_map`
An implementation that cannot run on the current backend or dtype falls back to `xla` with a
warning logged once, so one config runs on CPU tests and on the pod.

Shapes: q, k, v are (batch, length, heads, head_dim); the result has q's shape.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from unialignment_jax.parallel import rules as rules_lib

IMPLEMENTATIONS = ("xla", "cudnn", "tpu_flash")


@functools.lru_cache(maxsize=None)
def _warn_fallback(impl: str, why: str) -> None:
    logging.warning("attention %r unavailable (%s); using 'xla'", impl, why)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _tpu_flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    # The kernel sees one shard: batch split like the activations, heads split over `tensor`;
    # the mesh is the one in context (jax.set_mesh).
    spec = rules_lib.logical_to_spec(("act_batch", "act_heads", None, None), rules_lib.current_rules())

    @functools.partial(jax.shard_map, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    def per_shard(q, k, v):  # (b, h, t, d) layout of the kernel
        return fa.flash_attention(q, k, v, sm_scale=q.shape[-1] ** -0.5)

    swap = lambda x: x.transpose(0, 2, 1, 3)
    return swap(per_shard(swap(q), swap(k), swap(v)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla") -> jax.Array:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention = {implementation!r}; choose one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    if implementation == "cudnn":
        if backend != "gpu":
            _warn_fallback("cudnn", f"backend is {backend}")
        elif q.dtype not in (jnp.bfloat16, jnp.float16):
            _warn_fallback("cudnn", f"dtype {q.dtype} (cuDNN attention needs bf16/fp16)")
        else:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if implementation == "tpu_flash":
        if backend != "tpu":
            _warn_fallback("tpu_flash", f"backend is {backend}")
        elif q.shape[1] % 128:
            _warn_fallback("tpu_flash", f"sequence length {q.shape[1]} is not a multiple of 128")
        elif jax.sharding.get_abstract_mesh().empty or not rules_lib.current_rules():
            _warn_fallback("tpu_flash", "no mesh / sharding rules in context")
        else:
            return _tpu_flash(q, k, v)
    return xla_attention(q, k, v)
