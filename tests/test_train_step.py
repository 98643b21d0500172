"""The train step itself: gradient accumulation equals the big-batch step, frozen parameters do not
move, the EMA follows its formula, and a non-finite step leaves the state untouched."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialignment_jax import config as config_lib
from unialignment_jax.data import pipeline
from unialignment_jax.interop.convert import flatten
from unialignment_jax.models import create
from unialignment_jax.parallel import mesh as mesh_lib
from unialignment_jax.parallel import rules as rules_lib
from unialignment_jax.training import aot, encoders, schedule as schedule_lib, state as state_lib, step as step_lib


@pytest.fixture(scope="module")
def setup(repo_root):
    config = config_lib.load(f"{repo_root}/experiments/demo.py:tiny", [
        "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.batch_size=16", "--config.ema.decay=0.9",
        "--config.optimizer.grad_clip=0.0"])
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    spec = aot.train_state_spec(config, mesh, rules)
    frozen = encoders.build_frozen(config, mesh, rules)
    stage = schedule_lib.from_config(config).stages[0]
    it = pipeline.make_train_iterator(config, "t2i", batch_size=16, resolution=stage.resolution)
    batch = pipeline.to_global_batch(next(it), mesh)
    with create.sharding_context(mesh, rules):
        state = jax.jit(spec.fresh, out_shardings=spec.shardings)()
    # Non-zero AdaLN modulation so every block (and the gates) get gradients.
    state = state._replace(params=jax.tree.map(lambda p: p + 0.01, state.params))
    return config, mesh, rules, spec, frozen, stage, batch, state


def run_step(setup, stage, state=None, batch=None, lr=1e-3, reduce="mean"):
    config, mesh, rules, spec, frozen, _, default_batch, default_state = setup
    state = default_state if state is None else state
    batch = default_batch if batch is None else batch
    trainable = state_lib.trainable_mask(state.params, stage.is_trainable)
    statics = dataclasses.replace(aot.step_statics(config, spec, frozen), grad_accum_reduce=reduce)
    fn = step_lib.build_train_step(statics, stage, "t2i", trainable)
    copy = jax.tree.map(jnp.copy, state)  # the step donates its state
    with create.sharding_context(mesh, rules):
        new, metrics = jax.jit(fn, out_shardings=(spec.shardings, None), donate_argnums=(0,))(
            copy, frozen.arrays, batch, np.float32(lr))
    return jax.block_until_ready(new), jax.device_get(metrics)


def adam_mu(state):
    (adam,) = [s for s in state.opt_state if hasattr(s, "mu")]
    return adam.mu


def test_accumulation_equals_the_big_batch(setup):
    stage = setup[5]
    # Contrastive negatives are per micro-batch by construction: leave that term out here.
    weights = dataclasses.replace(stage.weights, contrastive=0.0)
    big, m1 = run_step(setup, dataclasses.replace(stage, weights=weights, accum_steps=1))
    acc, m4 = run_step(setup, dataclasses.replace(stage, weights=weights, accum_steps=2))
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)
    # Compare the gradients through Adam's first moment (mu = (1 - b1) g after one step): the
    # parameters themselves moved by lr * g / |g|, which flips sign for near-zero gradients.
    mu_big, mu_acc = flatten(adam_mu(big)), flatten(adam_mu(acc))
    for k in mu_big:
        a, b = np.asarray(mu_big[k]), np.asarray(mu_acc[k])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=k)
    # The official reduction (sum, no division) scales the gradient by the number of micro-batches.
    _, summed = run_step(setup, dataclasses.replace(stage, weights=weights, accum_steps=2), reduce="sum")
    assert summed["grad_norm"] == pytest.approx(2 * m4["grad_norm"], rel=1e-5)


def test_frozen_parameters_do_not_change_and_ema_follows_its_formula(setup):
    stage = dataclasses.replace(setup[5], trainable=r"blocks/.*")
    before = setup[7]
    after, metrics = run_step(setup, stage)
    moved = {k for k, (a, b) in zip(flatten(before.params), zip(flatten(before.params).values(),
                                                                  flatten(after.params).values()))
             if not np.array_equal(np.asarray(a), np.asarray(b))}
    assert moved and all(k.startswith("blocks/") for k in moved), moved
    assert "text_proj_out/kernel" not in moved and "adapter_img/fc1/kernel" not in moved
    decay = min(0.9, (1 + 0) / (10 + 0))  # warm-up at step 0
    for k, e0, p1, e1 in zip(flatten(before.ema), flatten(before.ema).values(), flatten(after.params).values(),
                             flatten(after.ema).values()):
        np.testing.assert_allclose(np.asarray(e1), np.asarray(e0) + (1 - decay) * (np.asarray(p1) - np.asarray(e0)),
                                   rtol=1e-6, atol=1e-7, err_msg=k)
    assert int(after.step) == 1 and metrics["finite"] == 1.0


def test_nonfinite_step_is_skipped(setup):
    batch = dict(setup[6])
    batch["target"] = batch["target"].at[0, 0, 0, 0].set(jnp.nan)
    before = setup[7]
    after, metrics = run_step(setup, setup[5], batch=batch)
    assert metrics["finite"] == 0.0 and int(after.nonfinite) == 1 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.ema)),
                    jax.tree.leaves((after.params, after.opt_state, after.ema))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # An update whose norm overflows float32 is skipped too (the loss and gradient were finite).
    after, metrics = run_step(setup, setup[5], lr=1e38)
    assert metrics["finite"] == 0.0 and np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
