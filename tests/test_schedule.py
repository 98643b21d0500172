"""training/schedule.py: learning rate per step, task per step (round robin and the seeded mixture),
stage boundaries, the trainable regex, and the ValueErrors naming the config key."""

import collections
import math

import numpy as np
import pytest

from unialignment_jax.config import base_config, new_stages, stage
from unialignment_jax.training import schedule as S


def make_config(seed=0, **stages):
    c = base_config()
    c.seed = seed
    c.stages = new_stages()
    for name, st in stages.items():
        c.stages[name] = st
    return c


def one_stage(**kw):
    kw.setdefault("steps", 10)
    return S.from_config(make_config(main=stage(**kw))).stages[0]


# ----------------------------------------------------------------------------- learning rate


def test_linear_warmup_then_constant():
    st = one_stage(steps=10, lr=1e-3, warmup_steps=4)
    got = [st.lr_at(k) for k in range(10)]
    # Ours: lr * (k + 1) / warmup at stage step k (the first step already trains).
    want = [2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 7
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert st.lr_at(0) > 0
    # No warm-up: the full rate from the first step.
    st = one_stage(steps=5, lr=2e-4, warmup_steps=0)
    assert [st.lr_at(k) for k in range(5)] == [2e-4] * 5


def test_warmup_is_the_official_schedule_one_step_ahead():
    """diffusers' get_constant_schedule_with_warmup (the official code's) gives k / warmup: 0 at the
    first step. Ours at step k equals theirs at step k + 1 (the documented, deliberate difference)."""
    torch = pytest.importorskip("torch")
    from diffusers.optimization import get_constant_schedule_with_warmup

    lr, warmup, steps = 3e-5, 5, 9
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup)
    official = []
    for _ in range(steps + 1):
        official.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert official[0] == 0.0
    st = one_stage(steps=steps, lr=lr, warmup_steps=warmup)
    np.testing.assert_allclose([st.lr_at(k) for k in range(steps)], official[1:], rtol=1e-12, atol=0)


def test_cosine_decay_to_final_fraction():
    lr, w, n, f = 1e-3, 2, 12, 0.1
    st = one_stage(steps=n, lr=lr, warmup_steps=w, lr_schedule="cosine", final_lr_fraction=f)
    got = np.array([st.lr_at(k) for k in range(n + 3)])
    want = []
    for k in range(n + 3):
        warm = min(1.0, (k + 1) / w)
        progress = min(max((k - w) / (n - w), 0.0), 1.0)
        want.append(lr * warm * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress))))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # Literal checkpoints: warm-up, the peak at the end of warm-up, half way, the floor.
    assert got[0] == pytest.approx(0.5 * lr)
    assert got[w] == pytest.approx(lr)
    assert got[w + (n - w) // 2] == pytest.approx(lr * (f + (1 - f) / 2))  # progress 0.5
    assert got[n] == pytest.approx(f * lr) and got[n + 2] == pytest.approx(f * lr)
    assert np.all(np.diff(got[w:n + 1]) < 0)  # strictly decreasing after warm-up
    assert got[n - 1] > f * lr
    # final_lr_fraction 0 (the default) decays to zero.
    st0 = one_stage(steps=n, lr=lr, warmup_steps=w, lr_schedule="cosine")
    assert st0.lr_at(n) == pytest.approx(0.0, abs=1e-18)
    assert st0.lr_at(w + 1) < lr
    # The constant schedule ignores final_lr_fraction.
    stc = one_stage(steps=n, lr=lr, warmup_steps=w, final_lr_fraction=f)
    assert stc.lr_at(n - 1) == pytest.approx(lr)


# ----------------------------------------------------------------------------- tasks and stages


def three_stages(seed=0):
    return S.from_config(make_config(
        seed=seed,
        first=stage(steps=5, tasks="t2i,edit"),
        second=stage(steps=6, tasks="t2i,edit,t2i,perception"),
        third=stage(steps=3, tasks="caption"),
    ))


def test_round_robin_restarts_at_each_stage():
    sch = three_stages()
    got = [sch.task_at(k) for k in range(sch.total_steps)]
    assert got == (["t2i", "edit", "t2i", "edit", "t2i"]  # stage 1 ends on t2i ...
                   + ["t2i", "edit", "t2i", "perception", "t2i", "edit"]  # ... stage 2 starts with t2i again
                   + ["caption"] * 3)


def test_duplicate_tasks_give_t2i_on_every_other_step():
    sch = S.from_config(make_config(main=stage(steps=40, tasks="t2i,edit,t2i,perception")))
    got = [sch.task_at(k) for k in range(40)]
    assert got[0::2] == ["t2i"] * 20
    assert got[1::2] == ["edit", "perception"] * 10
    assert sch.stages[0].tasks == ("t2i", "edit", "t2i", "perception") and sch.stages[0].task_probs is None


def test_stage_at_across_boundaries():
    sch = three_stages()
    assert [s.start for s in sch.stages] == [0, 5, 11] and [s.end for s in sch.stages] == [5, 11, 14]
    assert [s.index for s in sch.stages] == [0, 1, 2] and sch.total_steps == 14
    names = {k: sch.stage_at(k).name for k in (0, 4, 5, 10, 11, 13, 14, 100)}
    assert names == {0: "first", 4: "first", 5: "second", 10: "second", 11: "third", 13: "third",
                     14: "third", 100: "third"}  # past the end: the last stage


def test_stage_fields_from_config():
    c = make_config(a=stage(steps=3, lr=1e-4), b=stage(steps=4, batch_size=8, accum_steps=4, resolution=256))
    c.batch_size = 12
    c.input.resolution = 512
    a, b = S.from_config(c).stages
    assert (a.batch_size, a.accum_steps, a.resolution, a.lr) == (12, 1, 512, 1e-4)  # 0 = the config's
    assert (b.batch_size, b.accum_steps, b.resolution) == (8, 4, 256)
    assert a.weights.text == pytest.approx(0.2) and a.weights.contrastive == pytest.approx(0.05)


def test_stage_order_is_the_config_order_not_alphabetical():
    sch = S.from_config(make_config(zeta=stage(steps=2, tasks="caption"), alpha=stage(steps=2, tasks="vqa")))
    assert [s.name for s in sch.stages] == ["zeta", "alpha"]
    assert [sch.task_at(k) for k in range(4)] == ["caption", "caption", "vqa", "vqa"]


# ----------------------------------------------------------------------------- weighted mixture


def mixture(seed=0, weights="3,1,0", tasks="t2i,edit,perception", steps=4000):
    return S.from_config(make_config(seed=seed, main=stage(steps=steps, tasks=tasks, task_weights=weights)))


def test_weighted_mixture_is_deterministic_by_seed_and_history_free():
    n = 500
    a = [mixture(seed=1).task_at(k) for k in range(n)]
    assert a == [mixture(seed=1).task_at(k) for k in range(n)]
    sch = mixture(seed=1)
    assert [sch.task_at(k) for k in reversed(range(n))][::-1] == a  # a pure function of (seed, step)
    b = [mixture(seed=2).task_at(k) for k in range(n)]
    assert a != b
    assert sum(x != y for x, y in zip(a, b)) > 0.2 * n
    assert mixture(seed=1).stages[0].task_probs == pytest.approx((0.75, 0.25, 0.0))


def test_weighted_mixture_frequencies_follow_the_weights():
    n = 4000
    sch = mixture(weights="3,1,0", steps=n)
    counts = collections.Counter(sch.task_at(k) for k in range(n))
    assert counts["perception"] == 0  # weight 0: never drawn
    assert abs(counts["t2i"] / n - 0.75) < 0.03  # binomial sd ~0.007
    assert abs(counts["edit"] / n - 0.25) < 0.03
    # Zero weights first and in the middle; unnormalised weights.
    sch = mixture(weights="0,2,0,6", tasks="t2i,edit,perception,caption", steps=n)
    counts = collections.Counter(sch.task_at(k) for k in range(n))
    assert set(counts) == {"edit", "caption"}
    assert abs(counts["caption"] / n - 0.75) < 0.03
    # Not round robin: some task repeats on consecutive steps.
    seq = [sch.task_at(k) for k in range(100)]
    assert any(x == y for x, y in zip(seq, seq[1:])) and len(set(seq)) == 2


def test_weighted_mixture_draw_just_below_one(monkeypatch):
    """The cumulative weights can end just below 1.0 (ten equal weights: 0.9999999999999999); the
    largest draw must still pick the last task, not index past the list."""
    sch = mixture(weights=",".join(["1"] * 10), tasks=",".join(["t2i", "edit"] * 5), steps=10)

    class Gen:
        def random(self):
            return 1.0 - 2.0**-53  # the largest value Generator.random() can return

    monkeypatch.setattr(S.np.random, "default_rng", lambda seed: Gen())
    assert sch.task_at(0) == "edit"  # the last task


# ----------------------------------------------------------------------------- trainable regex


def test_trainable_regex_is_a_full_match_over_paths():
    st = one_stage(trainable="blocks/.*|null_image_embd")
    assert st.is_trainable("blocks/img/qkv/kernel") and st.is_trainable("blocks/txt/mlp_out/bias")
    assert st.is_trainable("null_image_embd")
    assert not st.is_trainable("text_proj_out/kernel")
    assert not st.is_trainable("null_image_embd/extra")  # fullmatch, not search
    assert not st.is_trainable("adapter_img/blocks/kernel")
    everything = one_stage()
    assert everything.trainable == ".*" and everything.is_trainable("anything/at/all")


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("overrides, key", [
    (dict(lr_schedule="linear"), "config.stages.main.lr_schedule"),
    (dict(trainable="blocks/("), "config.stages.main.trainable"),
    (dict(tasks="t2i,edit", task_weights="1,2,3"), "config.stages.main.task_weights"),
    (dict(tasks="t2i,edit", task_weights="1"), "config.stages.main.task_weights"),
    (dict(tasks="t2i,edit", task_weights="-1,2"), "config.stages.main.task_weights"),
    (dict(tasks="t2i,edit", task_weights="0,0"), "config.stages.main.task_weights"),
    (dict(accum_steps=5), "config.stages.main.accum_steps"),  # 384 % 5
    (dict(batch_size=6, accum_steps=4), "config.stages.main.accum_steps"),
    (dict(tasks="t2i,paint"), "config.stages.main.tasks"),
    (dict(tasks=" , "), "config.stages.main.tasks"),
])
def test_bad_values_raise_value_error_naming_the_key(overrides, key):
    c = make_config(ok=stage(steps=2), main=stage(steps=3, **overrides))
    with pytest.raises(ValueError) as e:
        S.from_config(c)
    assert str(e.value).startswith(key), str(e.value)


def test_good_values_next_to_bad_ones_pass():
    c = make_config(main=stage(steps=3, batch_size=8, accum_steps=4, tasks="t2i,edit", task_weights="1,0",
                               trainable="blocks/.*", lr_schedule="cosine"))
    assert S.from_config(c).stages[0].task_probs == (1.0, 0.0)
