"""Parity of the JAX MMDiT with the PyTorch reference of the official class (float32, 1e-5).

Random weights (every parameter, including the zero-initialised AdaLN ones) are copied through the
name table into `tests/torch_reference.py`, loaded with `strict=True`, and both models run the same
inputs: t2i, edit (one condition image), compose (three), text-only, and the text pass (clean image
at timestep 0).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from tests.torch_reference import reference_from_config  # noqa: E402
from unialignment_jax.interop import convert  # noqa: E402
from unialignment_jax.models import create  # noqa: E402
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT  # noqa: E402

CFG = DiTConfig(num_layers=3, num_heads=4, head_dim=8, patch_size=2, in_channels=4, out_channels=4,
                sample_size=8, pos_embed_max_size=12, context_dim=24, vocab_size=50, timestep_dim=32,
                num_null_tokens=8, block_depth=2, adapter_hidden=40, adapter_out=20)


def randomized_model(cfg: DiTConfig, seed: int = 0) -> UniAlignmentDiT:
    model = create.build_local(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(seed)))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def torch_twin(model: UniAlignmentDiT, cfg: DiTConfig):
    ref = reference_from_config(cfg)
    sd = {k: torch.from_numpy(v) for k, v in convert.to_official(nnx.state(model, nnx.Param), cfg).items()}
    ref.load_state_dict(sd, strict=True)
    return ref


def run_both(cfg, model, ref, task, seed=0):
    rng = np.random.default_rng(seed)
    b, h, w, c = 2, 6, 8, cfg.in_channels  # a non-square grid exercises the position-table crop
    latents = rng.standard_normal((b, h, w, c)).astype(np.float32)
    context = rng.standard_normal((b, 7, cfg.context_dim)).astype(np.float32)
    t = np.array([0.0, 0.0]) if task == "text_pass" else np.array([731.0, 12.0])
    t = t.astype(np.float32)
    n_cond = {"edit": 1, "compose": 3}.get(task, 0)
    cond = rng.standard_normal((b, n_cond, h, w, c)).astype(np.float32) if n_cond else None
    lat = None if task == "text_only" else latents

    ours = model(None if lat is None else jnp.asarray(lat), jnp.asarray(context), jnp.asarray(t),
                 None if cond is None else jnp.asarray(cond), tap=True)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        theirs = ref(None if lat is None else nchw(lat), torch.from_numpy(context), torch.from_numpy(t),
                     [nchw(cond[:, k]) for k in range(n_cond)], block_depth=cfg.block_depth)
    theirs = {k: v.numpy() for k, v in theirs.items()}
    if "velocity" in theirs:
        theirs["velocity"] = theirs["velocity"].transpose(0, 2, 3, 1)
    return {k: np.asarray(v) for k, v in ours.items()}, theirs


@pytest.mark.parametrize("task", ["t2i", "edit", "compose", "text_only", "text_pass"])
def test_matches_torch_reference(task):
    model = randomized_model(CFG)
    ref = torch_twin(model, CFG)
    ours, theirs = run_both(CFG, model, ref, task)
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5, err_msg=f"{task}: {k}")


def test_matches_with_qk_norm_and_exact_timesteps():
    cfg = dataclasses.replace(CFG, qk_norm=True, timestep_fp16_round=False)
    model = randomized_model(cfg, seed=3)
    ref = torch_twin(model, cfg)
    ours, theirs = run_both(cfg, model, ref, "edit", seed=1)
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5, err_msg=k)



def assert_table_close(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.abs(got.astype(np.float64) - want).max())  # (allclose is slow on the 2B table)
    assert err <= 1e-6, f"{what}: max abs difference {err}"


@pytest.mark.parametrize("cfg, crops", [
    (CFG, [(3, 4), (6, 6), (5, 12), (12, 12), (1, 1)]),
    (DiTConfig(), [(64, 64), (32, 48), (96, 96), (192, 192), (17, 5)]),  # 2B: 192 max size, width 1536
])
def test_position_table_equals_diffusers_buffer(cfg, crops):
    """Our fixed sin-cos table against diffusers' own `pos_embed.pos_embed` buffer, built the way
    SD3Transformer2DModel builds its PatchEmbed (height = width = sample_size, pos_embed_max_size),
    and its centre crop (`cropped_pos_embed`) for smaller and non-square token grids. (The model
    parity tests above copy our table into the reference, so they cannot catch a wrong table.)"""
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    from unialignment_jax.models import embeddings

    d, m, p = cfg.width, cfg.pos_embed_max_size, cfg.patch_size
    ref = PatchEmbed(height=cfg.sample_size, width=cfg.sample_size, patch_size=p, in_channels=cfg.in_channels,
                     embed_dim=d, pos_embed_max_size=m)
    buffer = ref.pos_embed.numpy()
    assert buffer.shape == (1, m * m, d)
    ours = embeddings.sincos_table(d, m, cfg.sample_size // p)
    assert ours.dtype == np.float32
    assert_table_close(ours, buffer[0], "table")
    if m * d < 10_000:  # the function itself too (base size = the default grid, sample_size / patch)
        direct = get_2d_sincos_pos_embed(d, m, base_size=cfg.sample_size // p, output_type="pt").numpy()
        assert_table_close(ours, direct, "get_2d_sincos_pos_embed")
    for h, w in crops:
        want = ref.cropped_pos_embed(h * p, w * p).numpy()[0]  # takes latent sizes
        assert_table_close(embeddings.cropped_pos_embed(d, m, cfg.sample_size // p, h, w), want, f"{h}x{w} crop")


def test_tiny_reference_model_builds_the_same_buffer():
    """The reference class itself (an SD3Transformer2DModel) before any weights are copied in, and
    the table our model adds in `embed_image` (zero patch projection, zero latents)."""
    from unialignment_jax.models import embeddings

    ref = reference_from_config(CFG)
    buffer = ref.pos_embed.pos_embed.detach().numpy()[0]
    assert_table_close(embeddings.sincos_table(CFG.width, CFG.pos_embed_max_size, CFG.sample_size // CFG.patch_size),
                       buffer, "table")
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UniAlignmentDiT(CFG, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract))
    tokens = np.asarray(model.embed_image(jnp.zeros((1, 6, 8, CFG.in_channels))))[0]
    assert_table_close(tokens, ref.pos_embed.cropped_pos_embed(6, 8).numpy()[0], "embed_image")
