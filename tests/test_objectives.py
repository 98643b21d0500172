"""The pure loss terms against our torch transcription of the official formulas (float32, 1e-5),
and their properties (docs/method.md "Losses", issue 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

torch = pytest.importorskip("torch")

from tests import official_losses as official  # noqa: E402
from tests.conftest import make_mesh  # noqa: E402
from unialignment_jax.objectives import alignment, contrastive, flow_matching, text_diffusion  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
MASK = text_diffusion.MASK_TOKEN_ID
VOCAB = MASK + 1  # the mask id must be a valid vocabulary entry; keep V small elsewhere


def t_(x):
    return torch.from_numpy(np.array(x))


# ------------------------------------------------------------------------- flow matching


def test_sigma_grid_matches_official_scheduler_table():
    # u from logit-normal draws, plus the grid edges (u = 0, u just below 1, values on grid points).
    rng = np.random.default_rng(0)
    u = jax.nn.sigmoid(jnp.asarray(rng.standard_normal(512), jnp.float32))
    u = jnp.concatenate([u, jnp.asarray([0.0, 0.9999, 0.5, 0.001, 0.123, 0.999], jnp.float32)])
    sigma = flow_matching.sigmas_from_uniform(u)
    ref_sigma, ref_timesteps = official.flow_sigmas_and_timesteps(t_(u))
    np.testing.assert_array_equal(np.asarray(sigma), ref_sigma.numpy())
    np.testing.assert_array_equal(np.asarray(flow_matching.model_timesteps(sigma)), ref_timesteps.numpy())
    grid = np.asarray(sigma) * 1000
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
    assert grid.min() >= 1 and grid.max() <= 1000


def test_sigma_u_equal_one_stays_on_the_table():
    assert float(flow_matching.sigmas_from_uniform(jnp.ones((1,)))[0]) == pytest.approx(0.001)


def test_sample_sigmas_is_logit_normal_on_the_grid():
    s = np.asarray(flow_matching.sample_sigmas(jax.random.key(0), 20000))
    np.testing.assert_allclose(s * 1000, np.round(s * 1000), atol=1e-3)
    # logit-normal(0, 1): median 0.5, P(sigma < 0.2689 = sigmoid(-1)) ~ 0.1587.
    assert abs(np.median(s) - 0.5) < 0.01
    assert abs(np.mean(s < 0.2689) - 0.1587) < 0.01


def test_timestep_shift_is_sd3_formula():
    u = jnp.linspace(0.0, 0.999, 64)
    base = np.asarray(flow_matching.sigmas_from_uniform(u))
    shifted = np.asarray(flow_matching.sigmas_from_uniform(u, shift=3.0))
    np.testing.assert_allclose(shifted, 3 * base / (1 + 2 * base), rtol=1e-6)
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.numpy()
    idx = np.floor(np.asarray(u) * 1000).astype(int)
    np.testing.assert_allclose(shifted, table[idx], rtol=1e-6)


def _flow_inputs(seed=0, shape=(3, 4, 6, 5)):
    rng = np.random.default_rng(seed)
    x0, noise, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    sigma = np.asarray(flow_matching.sigmas_from_uniform(jnp.asarray(rng.uniform(size=shape[0]), jnp.float32)))
    return x0, noise, v, sigma


def test_flow_loss_matches_official():
    x0, noise, v, sigma = _flow_inputs()
    ours, _ = flow_matching.image_flow_loss(v, x0, noise, sigma)
    np.testing.assert_allclose(float(ours), float(official.flow_loss(t_(v), t_(x0), t_(noise), t_(sigma))), **TOL)
    np.testing.assert_allclose(np.asarray(flow_matching.noisy_latents(x0, noise, sigma)),
                               official.flow_noisy_input(t_(x0), t_(noise), t_(sigma)).numpy(), **TOL)


def test_flow_default_is_sigma_squared_velocity_mse():
    x0, noise, v, sigma = _flow_inputs(1)
    ours, metrics = flow_matching.image_flow_loss(v, x0, noise, sigma)
    per = np.mean(((v - (noise - x0)) ** 2).reshape(len(v), -1), axis=1)
    np.testing.assert_allclose(float(ours), np.mean(sigma**2 * per), rtol=1e-5)
    velocity, _ = flow_matching.image_flow_loss(v, x0, noise, sigma, mode="velocity")
    np.testing.assert_allclose(float(velocity), np.mean(per), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["velocity_mse"]), np.mean(per), rtol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        flow_matching.image_flow_loss(v, x0, noise, sigma, mode="eps")


def test_cfg_dropout_matches_official_and_rate():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((6, 5, 3)).astype(np.float32)
    null = rng.standard_normal((1, 5, 3)).astype(np.float32)
    u = np.array([0.05, 0.5, 0.09, 0.1, 0.99, 0.0], np.float32)
    ours = flow_matching.apply_cfg_dropout(jnp.asarray(feats), jnp.asarray(null), jnp.asarray(u) < 0.1)
    np.testing.assert_array_equal(np.asarray(ours), official.cfg_dropout(t_(feats), t_(null), t_(u)).numpy())
    # The (L, D) form of the null features broadcasts the same way.
    np.testing.assert_array_equal(
        np.asarray(flow_matching.apply_cfg_dropout(jnp.asarray(feats), jnp.asarray(null[0]), jnp.asarray(u) < 0.1)),
        np.asarray(ours))
    drop = np.asarray(flow_matching.cfg_drop_mask(jax.random.key(1), 40000))
    assert abs(drop.mean() - 0.1) < 0.006
    out, mask = flow_matching.cfg_dropout(jax.random.key(3), jnp.asarray(feats), jnp.asarray(null))
    assert mask.shape == (6,)
    with pytest.raises(ValueError, match="null-prompt"):
        flow_matching.apply_cfg_dropout(jnp.asarray(feats), jnp.zeros((4, 3)), jnp.zeros(6, bool))


# ------------------------------------------------------------------------- text diffusion


def test_antithetic_t_matches_official_and_covers_each_stratum_once():
    n = 8
    for seed in range(5):
        u = jax.random.uniform(jax.random.key(seed), (n,))
        t = np.asarray(text_diffusion.stratified_t(u))
        np.testing.assert_allclose(t, official.antithetic_t(t_(u)).numpy(), **TOL)
        unit = (t - 1e-3) / (1 - 1e-3)
        assert sorted(np.floor(unit * n).astype(int)) == list(range(n))
        # sampled variants: official (one uniform per example), shared uniform, grouped strata
        for kw, g in [({}, n), ({"shared_uniform": True}, n), ({"group_size": 4}, 4)]:
            t = np.asarray(text_diffusion.sample_t(jax.random.key(seed + 10), n, **kw))
            assert t.min() >= 1e-3 and t.max() <= 1.0
            strata = np.floor((t - 1e-3) / (1 - 1e-3) * g).astype(int).reshape(-1, g)
            for row in strata:
                assert sorted(row) == list(range(g)), (kw, t)
    shared = np.asarray(text_diffusion.sample_t(jax.random.key(0), n, shared_uniform=True))
    np.testing.assert_allclose(np.diff(shared), 1 / n * (1 - 1e-3), rtol=1e-4)  # one U: equally spaced


def test_loss_weight_is_one_over_t():
    t = jnp.concatenate([jnp.linspace(1e-3, 1.0, 999), jnp.asarray([0.5])])
    np.testing.assert_allclose(np.asarray(text_diffusion.loss_weight(t)), 1 / np.asarray(t), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(text_diffusion.mask_probability(t)), (1 - 1e-3) * np.asarray(t),
                               rtol=1e-5, atol=1e-7)


def _text_inputs(seed=0, b=4, length=12, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    x0 = rng.integers(3, 200, size=(b, length)).astype(np.int64)
    x0[:, -3:] = 1  # EOS padding
    x0[:, -4] = 1
    u_t = rng.uniform(size=b).astype(np.float32)
    t = np.asarray(text_diffusion.stratified_t(jnp.asarray(u_t)))
    u_mask = rng.uniform(size=(b, length)).astype(np.float32)
    logits = (3 * rng.standard_normal((b, length, vocab))).astype(np.float32)
    return x0, t, u_mask, logits


def test_masking_matches_official():
    x0, t, u_mask, _ = _text_inputs()
    masked = text_diffusion.mask_from_uniform(jnp.asarray(u_mask), jnp.asarray(t))
    xt = np.asarray(text_diffusion.apply_mask(jnp.asarray(x0), masked))
    np.testing.assert_array_equal(xt, official.q_xt(t_(x0), t_(t), t_(u_mask)).numpy())
    assert 0 < np.mean(xt == MASK) < 1


@pytest.mark.parametrize("normalize", ["all", "tokens"])
def test_text_loss_matches_official(normalize):
    x0, t, u_mask, logits = _text_inputs(1)
    xt = np.asarray(text_diffusion.apply_mask(jnp.asarray(x0), text_diffusion.mask_from_uniform(
        jnp.asarray(u_mask), jnp.asarray(t))))
    ours, metrics = text_diffusion.text_diffusion_loss(jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(xt),
                                                       jnp.asarray(t), normalize=normalize)
    attention = np.asarray(text_diffusion.non_padding_mask(jnp.asarray(x0))).astype(np.float32)
    assert attention.sum(1).tolist() == [9.0] * 4  # 8 tokens + the first EOS
    ref = official.text_loss(t_(logits), t_(x0), t_(xt), t_(t), attention_mask=t_(attention),
                             ignore_padding=normalize == "tokens")
    np.testing.assert_allclose(float(ours), float(ref), **TOL)
    assert float(metrics["masked_fraction"]) == pytest.approx(np.mean(xt == MASK))
    # the full SUBS table equals the official one
    np.testing.assert_allclose(np.asarray(text_diffusion.subs_log_probs(jnp.asarray(logits), jnp.asarray(xt))),
                               official.subs(t_(logits), t_(xt)).numpy(), **TOL)


def test_text_loss_vqa_prefix_matches_official_label_mask():
    x0, t, u_mask, logits = _text_inputs(2)
    prefix_len = np.array([0, 3, 5, 12], np.int32)
    masked = text_diffusion.mask_from_uniform(jnp.asarray(u_mask), jnp.asarray(t), prefix_len=jnp.asarray(prefix_len))
    xt = np.asarray(text_diffusion.apply_mask(jnp.asarray(x0), masked))
    label_mask = (np.arange(12)[None] >= prefix_len[:, None]).astype(np.int64)
    ref_xt = official.q_xt(t_(x0), t_(t), t_(u_mask), cond_mask=t_(label_mask))
    np.testing.assert_array_equal(xt, ref_xt.numpy())
    assert not np.any(xt[np.arange(12)[None] < prefix_len[:, None]] == MASK)
    ours, _ = text_diffusion.text_diffusion_loss(jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(xt),
                                                 jnp.asarray(t), prefix_len=jnp.asarray(prefix_len))
    ref = official.text_loss(t_(logits), t_(x0), ref_xt, t_(t), label_mask=t_(label_mask))
    np.testing.assert_allclose(float(ours), float(ref), **TOL)
    # Even if a caller masked the prefix, it is never scored.
    xt_all = np.full_like(x0, MASK)
    with_prefix, _ = text_diffusion.text_diffusion_loss(jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(xt_all),
                                                        jnp.asarray(t), prefix_len=jnp.asarray(prefix_len))
    ref = official.text_loss(t_(logits), t_(x0), t_(xt_all), t_(t), label_mask=t_(label_mask))
    np.testing.assert_allclose(float(with_prefix), float(ref), **TOL)


def test_subs_gives_exactly_zero_at_unmasked_positions():
    x0, t, u_mask, logits = _text_inputs(3, vocab=64)
    mask_id = 63
    masked = jnp.asarray(u_mask) < 0.5
    xt = text_diffusion.apply_mask(jnp.asarray(x0 % 60), masked, mask_id)
    x0 = jnp.asarray(x0 % 60)

    def loss(lg):
        return text_diffusion.text_diffusion_loss(lg, x0, xt, jnp.asarray(t), mask_id=mask_id)[0]

    grads = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    unmasked = ~np.asarray(masked)
    assert unmasked.any() and np.all(grads[unmasked] == 0.0)
    assert np.all(np.abs(grads[~unmasked]).sum(-1) > 0)
    # Changing logits at unmasked positions does not change the loss at all (not even by rounding).
    garbage = np.where(unmasked[..., None], 1e4 * np.random.default_rng(0).standard_normal(logits.shape), logits)
    assert float(loss(jnp.asarray(garbage, jnp.float32))) == float(loss(jnp.asarray(logits)))
    # Nothing masked: exactly zero loss; the SUBS table is exactly 0 at the observed token.
    assert float(text_diffusion.text_diffusion_loss(jnp.asarray(logits), x0, x0, jnp.asarray(t),
                                                    mask_id=mask_id)[0]) == 0.0
    lp = np.asarray(text_diffusion.subs_log_probs(jnp.asarray(logits), x0, mask_id))
    assert np.all(np.take_along_axis(lp, np.asarray(x0)[..., None], -1) == 0.0)
    # and the mask token has (effectively) zero probability at masked positions
    lp = np.asarray(text_diffusion.subs_log_probs(jnp.asarray(logits), xt, mask_id))
    assert np.all(lp[np.asarray(masked)][:, mask_id] < -1e5)


def test_non_padding_mask():
    ids = jnp.asarray([[5, 6, 1, 1, 1], [5, 6, 7, 8, 9], [1, 1, 1, 1, 1], [5, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(text_diffusion.non_padding_mask(ids)),
                                  [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])


# ----------------------------------------------------------------------- contrastive, alignment


def _features(seed, b=8, t=5, length=7, d=6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, t, d)).astype(np.float32) + 0.3,
            rng.standard_normal((b, length, d)).astype(np.float32) + 0.3)


def test_info_nce_matches_official():
    img, txt = _features(0, b=4)  # the official micro-batch size
    ours, metrics = contrastive.symmetric_info_nce(img, txt)
    np.testing.assert_allclose(float(ours), float(official.contrastive(t_(img), t_(txt))), **TOL)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_info_nce_group_size_equals_official_micro_batches():
    img, txt = _features(1, b=12)
    grouped, _ = contrastive.symmetric_info_nce(img, txt, group_size=4)
    np.testing.assert_allclose(float(grouped), float(official.contrastive_micro_batches(t_(img), t_(txt), 4)), **TOL)
    per_group = [float(contrastive.symmetric_info_nce(img[i:i + 4], txt[i:i + 4])[0]) for i in range(0, 12, 4)]
    np.testing.assert_allclose(float(grouped), np.mean(per_group), **TOL)
    whole, _ = contrastive.symmetric_info_nce(img, txt)
    assert abs(float(whole) - float(grouped)) > 1e-3  # global negatives are a different objective
    with pytest.raises(ValueError, match="group_size"):
        contrastive.symmetric_info_nce(img, txt, group_size=5)


def test_info_nce_global_negatives_sharded_equals_single_device():
    mesh = make_mesh(2, 4, 1)  # 8 simulated devices, batch over (data, fsdp)
    img, txt = _features(2, b=16)
    single = float(contrastive.symmetric_info_nce(img, txt)[0])
    np.testing.assert_allclose(single, float(official.contrastive(t_(img), t_(txt))), **TOL)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    img_s, txt_s = jax.device_put(img, sharding), jax.device_put(txt, sharding)
    assert len(img_s.addressable_shards) == 8 and img_s.addressable_shards[0].data.shape[0] == 2
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda a, b: contrastive.symmetric_info_nce(a, b)[0])
        sharded = fn(img_s, txt_s)
        grouped = jax.jit(lambda a, b: contrastive.symmetric_info_nce(a, b, group_size=2)[0])(img_s, txt_s)
    jax.block_until_ready((sharded, grouped))
    np.testing.assert_allclose(float(sharded), single, **TOL)
    np.testing.assert_allclose(float(grouped), float(contrastive.symmetric_info_nce(img, txt, group_size=2)[0]), **TOL)


def test_alignment_matches_official_and_stops_teacher_gradient():
    rng = np.random.default_rng(3)
    g, y = rng.standard_normal((5, 9)).astype(np.float32), rng.standard_normal((5, 9)).astype(np.float32)
    ours, metrics = alignment.cosine_alignment_loss(g, y)
    np.testing.assert_allclose(float(ours), float(official.cosine_similarity_loss(t_(g), t_(y))), **TOL)
    assert float(metrics["cosine"]) == pytest.approx(1 - float(ours), abs=1e-6)
    assert float(alignment.cosine_alignment_loss(y, 3 * y)[0]) == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.asarray(jax.grad(lambda yy: alignment.cosine_alignment_loss(g, yy)[0])(y)) == 0)
    with pytest.raises(ValueError, match="adapter_out"):
        alignment.cosine_alignment_loss(g, y[:, :4])
