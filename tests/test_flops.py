"""The MFU formula (models/flops.py): analytic matmul FLOPs, 3x forward for a trained pass, no remat,
full non-causal joint attention. Checked against a hand count of one joint block, and against the
matmuls the model actually runs (every dot_general in the traced program, counted exactly)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unialignment_jax.models import create, flops
from unialignment_jax.models.mmdit import DiTConfig, JointBlock, UniAlignmentDiT

CFG = DiTConfig(num_layers=2, num_heads=2, head_dim=16, patch_size=2, in_channels=4, out_channels=4, sample_size=8,
                pos_embed_max_size=8, context_dim=24, vocab_size=40, mlp_ratio=4, timestep_dim=16,
                num_null_tokens=4, block_depth=1, adapter_hidden=20, adapter_out=12)


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a (closed) jaxpr, through scans and sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _subjaxprs(eqn):
            total += repeat * matmul_flops(sub)
    return total


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(x, "jaxpr") and hasattr(x, "consts"):  # ClosedJaxpr
                yield x.jaxpr
            elif hasattr(x, "eqns"):  # Jaxpr
                yield x


def test_block_formula_equals_a_hand_count():
    d, r, n_img, n_txt = 96, 4, 20, 12
    n = n_img + n_txt
    cfg = DiTConfig(num_heads=3, head_dim=32, mlp_ratio=r)
    # By hand, one example: each stream's q, k, v (3 d x d), output (d x d) and MLP (d x 4d, 4d x d)
    # projections for each of its tokens; each stream's AdaLN modulation (d -> 6d) once; attention
    # scores QK^T and the weighted sum PV over all n x n token pairs of the joint sequence, every head.
    projections = n_img * 2 * (3 * d * d + d * d + d * r * d + r * d * d) \
        + n_txt * 2 * (3 * d * d + d * d + d * r * d + r * d * d)
    modulation = 2 * (2 * d * 6 * d)
    attention = 2 * n * n * d + 2 * n * n * d
    assert flops.block_forward_flops(cfg, n_img, n_txt) == projections + modulation + attention
    assert flops.train_pass_flops(1000) == 3000


@pytest.fixture(scope="module")
def block():
    with nnx.use_eager_sharding(False):
        return JointBlock(CFG, nnx.Rngs(0))


def test_block_formula_equals_the_models_matmuls(block):
    b, n_img, n_txt, d = 3, 10, 6, CFG.width
    img, txt, temb = jnp.ones((b, n_img, d)), jnp.ones((b, n_txt, d)), jnp.ones((b, d))
    graphdef, state = nnx.split(block)
    fwd = lambda s, i, t, e: nnx.merge(graphdef, s)(i, t, e)
    counted = matmul_flops(jax.make_jaxpr(fwd)(state, img, txt, temb).jaxpr)
    assert counted == b * flops.block_forward_flops(CFG, n_img, n_txt)

    # Training: gradients for the weights and for every input -> exactly 3x the forward matmuls.
    def loss(s, i, t, e):
        a, c = fwd(s, i, t, e)
        return jnp.sum(a) + jnp.sum(c)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    assert matmul_flops(jax.make_jaxpr(grad)(state, img, txt, temb).jaxpr) == 3 * counted


@pytest.mark.parametrize("scan", [True, False])
def test_whole_dit_forward_equals_the_models_matmuls(scan):
    import dataclasses

    cfg = dataclasses.replace(CFG, scan_layers=scan)
    model = create.build_local(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    b, side, L = 2, 8, 5
    lat = jnp.ones((b, side, side, cfg.in_channels))
    cond = jnp.ones((b, 1, side, side, cfg.in_channels))
    ctx, ts = jnp.ones((b, L, cfg.context_dim)), jnp.ones((b,))
    fwd = lambda s, x, c, t, k: nnx.merge(graphdef, s)(x, c, t, k, tap=True)
    counted = matmul_flops(jax.make_jaxpr(fwd)(state, lat, ctx, ts, cond).jaxpr)
    n_target = (side // cfg.patch_size) ** 2
    assert counted == b * flops.dit_forward_flops(cfg, n_target, n_target, L, tap=True)


def test_step_flops_counts_both_passes_and_the_frozen_encoder():
    from unialignment_jax.config import base_config

    c = base_config()
    cfg = DiTConfig.from_config(c.model)
    n = (c.input.resolution // c.input.latent_downsample // cfg.patch_size) ** 2
    L = c.input.text_length
    te = c.text_encoder
    t5 = flops.t5_forward_flops(te.d_model, te.num_layers, te.num_heads, te.d_kv, te.d_ff, L)
    t2i = 3 * flops.dit_forward_flops(cfg, n, 0, L) * 2 + 2 * t5
    assert flops.step_flops(c, "t2i", 4) == 4 * t2i
    caption = 3 * flops.dit_forward_flops(cfg, n, 0, L) + t5  # text pass only
    assert flops.step_flops(c, "caption", 4) == 4 * caption
    assert np.isclose(flops.step_flops(c, "t2i", 1) / 1e12, t2i / 1e12)
