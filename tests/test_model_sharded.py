"""The DiT on 8 simulated devices: every task's forward, output shapes, parameter shardings, and
the 2B parameter count from abstract shapes (docs/method.md, "Parameter count")."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unialignment_jax.interop.convert import flatten
from unialignment_jax.models import create
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
from unialignment_jax.parallel import rules as rules_lib

TINY = DiTConfig(num_layers=3, num_heads=4, head_dim=16, patch_size=2, in_channels=4, out_channels=4,
                 sample_size=8, pos_embed_max_size=16, context_dim=32, vocab_size=64, timestep_dim=32,
                 block_depth=2, adapter_hidden=48, adapter_out=40)


def test_2b_parameter_count_matches_method():
    cfg = DiTConfig()  # the defaults are the 2B model
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0))))
    flat = flatten(state)
    count = lambda prefix: sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith(prefix))
    total = count("")
    adapters = count("adapter_img") + count("adapter_txt")
    # docs/method.md "Parameter count": 84.98M per block, 2.0395B blocks, 49.34M text head, 4.82M image head,
    # ~2.103B transformer, 2 x 10.49M adapters, ~2.124B while training.
    assert count("blocks") == pytest.approx(2.0395e9, rel=1e-4)
    assert count("blocks") / 24 == pytest.approx(84.98e6, rel=1e-4)
    assert count("text_proj_out") == pytest.approx(49.34e6, rel=1e-4)
    assert count("image_norm_out") + count("image_proj_out") == pytest.approx(4.82e6, rel=1e-3)
    assert count("context_embedder") == pytest.approx(6.29e6, rel=1e-3)
    assert count("time_embed") == 256 * 1536 + 1536 + 1536 * 1536 + 1536  # 2.76M
    assert count("null_image_embd") == 8 * 1536
    assert adapters == pytest.approx(20.98e6, rel=1e-3)
    assert total - adapters == pytest.approx(2.103e9, rel=1e-3)
    assert total == pytest.approx(2.124e9, rel=1e-3)


@pytest.fixture(scope="module")
def sharded(mesh_222):
    rules = rules_lib.get_rules("fsdp_tp")
    model = create.create_sharded(lambda: UniAlignmentDiT(TINY, rngs=nnx.Rngs(0)), mesh_222, rules)
    return model, rules


def test_parameter_shardings_follow_the_rules(sharded, mesh_222):
    model, rules = sharded
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
    checked = 0
    for (path, var), (_, spec_var) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs)):
        names = var.get_metadata()["out_sharding"]
        expected = rules_lib.logical_to_spec(names, rules)
        assert var[...].sharding.spec == expected, (path, var[...].sharding.spec, expected)
        assert var[...].sharding.mesh.shape == mesh_222.shape
        checked += 1
    assert checked > 20
    # Spot checks against the preset's intent.
    flat = flatten(state)
    assert flat["blocks/img/qkv/kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
    assert flat["blocks/txt/mlp_out/kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert flat["text_proj_out/kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # The stacked-layer axis is never sharded (flax issue 5112).
    assert all(v.sharding.spec[0] is None for k, v in flat.items() if k.startswith("blocks/"))


def test_sharded_init_equals_local_init(sharded):
    model, _ = sharded
    # Both jitted: an eager (op-by-op) init may differ in the last ulp of erfinv-based normals.
    with nnx.use_eager_sharding(False):
        local = jax.jit(lambda: nnx.state(UniAlignmentDiT(TINY, rngs=nnx.Rngs(0))))()
    a, b = flatten(nnx.state(model)), flatten(local)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


TASK_INPUTS = {  # task -> (has target latents, number of condition images, timestep)
    "t2i": (True, 0, 500.0),
    "edit": (True, 1, 500.0),
    "perception": (True, 1, 500.0),
    "compose": (True, 3, 500.0),
    "text_only": (False, 0, 0.0),
    "text_pass": (True, 0, 0.0),
}


@pytest.mark.parametrize("task", list(TASK_INPUTS))
def test_every_task_forward_on_the_mesh(sharded, mesh_222, task):
    model, rules = sharded
    graphdef, state = nnx.split(model)
    has_target, n_cond, t = TASK_INPUTS[task]
    b, h, w, L = 8, 8, 12, 10
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((b, h, w, 4)), jnp.float32) if has_target else None
    cond = jnp.asarray(rng.standard_normal((b, n_cond, h, w, 4)), jnp.float32) if n_cond else None
    context = jnp.asarray(rng.standard_normal((b, L, 32)), jnp.float32)
    ts = jnp.full((b,), t)

    @jax.jit
    def forward(state, latents, context, ts, cond):
        return nnx.merge(graphdef, state)(latents, context, ts, cond, tap=True)

    with create.sharding_context(mesh_222, rules):
        out = forward(state, latents, context, ts, cond)
    n_target = (h // 2) * (w // 2) if has_target else TINY.num_null_tokens
    expected = {"text_logits": (b, L, 64), "text_hidden": (b, L, 64), "tap_image": (b, 40), "tap_text": (b, 40)}
    if has_target:
        expected.update(velocity=(b, h, w, 4), image_hidden=(b, n_target, 64))
    assert {k: v.shape for k, v in out.items()} == expected
    for v in out.values():
        assert bool(jnp.all(jnp.isfinite(v)))
    # The batch stays split over the data-parallel axes.
    assert out["text_logits"].sharding.spec[0] == ("data", "fsdp")


def test_scan_unrolled_and_remat_agree():
    """`scan_layers` and `remat` change compilation, never the numbers (same stacked parameters)."""
    rng = np.random.default_rng(1)
    latents = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    ts = jnp.array([100.0, 900.0])
    outs, grads = [], []
    for scan, remat in [(True, "none"), (False, "none"), (True, "full"), (True, "dots"), (True, "dots_except_scores"),
                        (True, "dots_no_batch")]:
        cfg = dataclasses.replace(TINY, scan_layers=scan, remat=remat)
        model = create.build_local(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0)))
        # Non-zero modulation so that every block contributes.
        nnx.update(model, jax.tree.map(lambda x: x + 0.01, nnx.state(model, nnx.Param)))
        graphdef, state = nnx.split(model)

        def loss(state):
            out = nnx.merge(graphdef, state)(latents, context, ts, tap=True)
            return jnp.mean(out["velocity"] ** 2) + jnp.mean(out["tap_text"]) + jnp.mean(out["text_logits"] ** 2)

        value, grad = jax.jit(jax.value_and_grad(loss))(state)
        outs.append(float(value))
        grads.append(flatten(grad))
    for other, g in zip(outs[1:], grads[1:]):
        assert other == pytest.approx(outs[0], rel=1e-5)
        for k in grads[0]:
            np.testing.assert_allclose(np.asarray(g[k]), np.asarray(grads[0][k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_tap_reads_block_depth():
    """The tap follows block_depth, and is the adapters applied to the token means at that block."""
    rng = np.random.default_rng(2)
    latents = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    ts = jnp.array([10.0, 20.0])
    taps = []
    for depth in (1, 2, 3):
        cfg = dataclasses.replace(TINY, block_depth=depth, scan_layers=depth != 2)
        model = create.build_local(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0)))
        nnx.update(model, jax.tree.map(lambda x: x + 0.02, nnx.state(model, nnx.Param)))
        taps.append(model(latents, context, ts, tap=True))
    assert not np.allclose(taps[0]["tap_image"], taps[1]["tap_image"])
    assert not np.allclose(taps[1]["tap_text"], taps[2]["tap_text"])
    # Depth = num_layers: the adapters read the final streams (before the heads).
    img = model.embed_image(latents)
    txt = model.context_embedder(context)
    img, txt, _ = model.run_blocks(img, txt, jax.nn.silu(model.embed_timestep(ts)), img.shape[1], tap=False)
    np.testing.assert_allclose(taps[2]["tap_image"], model.adapter_img(img.mean(1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(taps[2]["tap_text"], model.adapter_txt(txt.mean(1)), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    model = create.build_local(lambda: UniAlignmentDiT(TINY, rngs=nnx.Rngs(0)))
    ctx = jnp.zeros((1, 4, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(jnp.zeros((1, 7, 8, 4)), ctx, jnp.zeros((1,)))
    with pytest.raises(ValueError, match="exceeds the position table"):
        model(jnp.zeros((1, 40, 8, 4)), ctx, jnp.zeros((1,)))
    with pytest.raises(ValueError, match="condition images need a target"):
        model(None, ctx, jnp.zeros((1,)), jnp.zeros((1, 1, 8, 8, 4)))
    with pytest.raises(ValueError, match="block_depth"):
        UniAlignmentDiT(dataclasses.replace(TINY, block_depth=9), rngs=nnx.Rngs(0))


def test_indivisible_dimensions_are_replicated():
    """A parameter dimension the mesh does not divide (a 175-row vocabulary on tensor = 2) is left
    unsplit; the other dimension keeps its axis, and divisible ones are unchanged."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from unialignment_jax.models.create import divisible

    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    got = divisible((128, 175), NamedSharding(mesh, P("fsdp", "tensor")))
    assert got.spec == P("fsdp", None)
    assert divisible((128, 176), NamedSharding(mesh, P("fsdp", "tensor"))).spec == P("fsdp", "tensor")
    assert divisible((6, 16), NamedSharding(mesh, P(("fsdp", "tensor"), None))).spec == P(None, None)
