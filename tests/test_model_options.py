"""Model options on CPU: the cudnn / tpu_flash attention settings fall back to the XLA path (with a
warning), and bfloat16 compute runs with float32 parameters and outputs, close to float32."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unialignment_jax.models import attention as attention_lib
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT

TINY = DiTConfig(num_layers=2, num_heads=4, head_dim=16, patch_size=2, in_channels=4, out_channels=4,
                 sample_size=8, pos_embed_max_size=16, context_dim=32, vocab_size=64, timestep_dim=32,
                 block_depth=1, adapter_hidden=48, adapter_out=40)


def model_for(cfg: DiTConfig, seed: int = 0) -> UniAlignmentDiT:
    """Same parameters for every option (the options change no parameter shape): random normal
    values for every parameter (non-zero AdaLN and heads, so attention and every block reach the
    outputs), drawn on the host into the abstract model (no eager init: it compiles per tensor)."""
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), abstract)
    return nnx.merge(graphdef, state)


def inputs(seed=0, b=2, h=8, w=6, n_cond=1):
    rng = np.random.default_rng(seed)
    latents = jnp.asarray(rng.standard_normal((b, h, w, 4)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((b, n_cond, h, w, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((b, 5, 32)), jnp.float32)
    return latents, context, jnp.array([250.0, 800.0])[:b], cond


def forward(cfg, seed=0):
    model = model_for(cfg, seed)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a, tap=True))
    return {k: np.asarray(v) for k, v in fn(state, *inputs(seed)).items()}, model


@pytest.mark.parametrize("impl", ["cudnn", "tpu_flash"])
def test_accelerator_attention_falls_back_to_xla_on_cpu(impl, caplog):
    assert jax.default_backend() == "cpu"
    want, _ = forward(dataclasses.replace(TINY, attention="xla"))
    attention_lib._warn_fallback.cache_clear()  # the warning is logged once per (impl, reason)
    with caplog.at_level(logging.WARNING):
        got, _ = forward(dataclasses.replace(TINY, attention=impl))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"attention '{impl}' unavailable (backend is cpu); using 'xla'" in msgs, msgs
    # Once: the model calls attention in every block (and scan traces it), the warning is cached.
    assert sum(f"attention '{impl}'" in m for m in msgs) == 1


def test_attention_fallback_reasons_and_unknown_name(monkeypatch, caplog):
    """The backend check comes first; then the dtype (cudnn) or sequence length / mesh (tpu_flash)."""
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 2, 8)), jnp.float32)
    want = np.asarray(attention_lib.xla_attention(q, q, q))
    attention_lib._warn_fallback.cache_clear()
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(np.asarray(attention_lib.attention(q, q, q, "cudnn")), want, rtol=1e-6)
    monkeypatch.setattr(attention_lib.jax, "default_backend", lambda: "tpu")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(np.asarray(attention_lib.attention(q, q, q, "tpu_flash")), want, rtol=1e-6)
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "cuDNN attention needs bf16/fp16" in msgs
    assert "sequence length 6 is not a multiple of 128" in msgs
    with pytest.raises(ValueError, match="model.attention = 'flash'"):
        attention_lib.attention(q, q, q, "flash")


def test_bfloat16_compute_float32_params_and_outputs():
    want, model32 = forward(TINY)
    got, model16 = forward(dataclasses.replace(TINY, dtype="bfloat16"))
    # Parameters stay float32 (param_dtype), and are the same numbers as the float32 model's.
    p32 = jax.tree.leaves(nnx.state(model32, nnx.Param))
    p16 = jax.tree.leaves(nnx.state(model16, nnx.Param))
    assert len(p16) == len(p32) > 20
    assert all(x.dtype == jnp.float32 for x in p16)
    for a, b in zip(p16, p32):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    b, h, w, L = 2, 8, 6, 5
    shapes = {"velocity": (b, h, w, 4), "image_hidden": (b, (h // 2) * (w // 2), 64), "text_logits": (b, L, 64),
              "text_hidden": (b, L, 64), "tap_image": (b, 40), "tap_text": (b, 40)}
    assert {k: v.shape for k, v in got.items()} == shapes
    assert all(v.dtype == np.float32 for v in got.values())
    assert all(np.isfinite(v).all() for v in got.values())
    rel = lambda k: np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
    assert rel("velocity") < 5e-2, rel("velocity")
    assert rel("text_logits") < 5e-2, rel("text_logits")
    # ... but the compute really is bfloat16 (not silently float32).
    assert rel("velocity") > 1e-5
    # Inside, the activations are bfloat16.
    latents, context, ts, cond = inputs()
    assert model16.embed_image(latents).dtype == jnp.bfloat16
    assert model32.embed_image(latents).dtype == jnp.float32


def test_layer_scans_unrolled_on_simulated_cpu_devices(monkeypatch):
    """8 simulated CPU devices: scans unrolled (XLA:CPU collective deadlock, models/layers.py),
    unless UNIALIGNMENT_CPU_SCAN=1 (compile-only tools); never a scan when not asked for."""
    from unialignment_jax.models.layers import CPU_SCAN_ENV, use_layer_scan

    assert jax.default_backend() == "cpu" and jax.device_count() > 1
    monkeypatch.delenv(CPU_SCAN_ENV, raising=False)
    assert use_layer_scan(True) is False and use_layer_scan(False) is False
    monkeypatch.setenv(CPU_SCAN_ENV, "1")
    assert use_layer_scan(True) is True and use_layer_scan(False) is False


def test_dots_except_scores_recomputes_only_the_attention_scores(capsys):
    """The remat policy keeps projections and PV (as `checkpoint_dots` does) and drops QK^T."""
    from jax.ad_checkpoint import print_saved_residuals

    from unialignment_jax.models.layers import REMAT_POLICIES

    b, t, h, d = 2, 12, 2, 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, t, h * d)), jnp.float32)
    w_qkv = jnp.asarray(rng.standard_normal((h * d, 3 * h * d)), jnp.float32)
    w_out = jnp.asarray(rng.standard_normal((h * d, h * d)), jnp.float32)

    def block(x, w_qkv, w_out):
        q, k, v = jnp.split((x @ w_qkv).reshape(b, t, 3, h, d), 3, axis=2)
        attn = attention_lib.xla_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        return jnp.sum((attn.reshape(b, t, h * d) @ w_out) ** 2)

    def kept(policy):  # the residuals' types, one per line ("f32[2,12,24] output of dot_general ...")
        capsys.readouterr()
        print_saved_residuals(jax.checkpoint(block, policy=REMAT_POLICIES[policy]), x, w_qkv, w_out)
        return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]

    # PV's output is kept in the dot's own dimension order: (b, h, d, q).
    shape = lambda *dims: "f32[" + ",".join(map(str, dims)) + "]"
    scores, qkv, pv = shape(b, h, t, t), shape(b, t, 3 * h * d), shape(b, h, d, t)
    assert scores in kept("dots") and qkv in kept("dots") and pv in kept("dots")
    assert scores not in kept("dots_except_scores")
    assert qkv in kept("dots_except_scores") and pv in kept("dots_except_scores")
