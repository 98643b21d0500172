"""The samplers (sampling/) on the tiny demo model on 8 simulated devices (mesh data=2 x fsdp=4):
the sigma grid and Euler steps against diffusers' scheduler, output shapes, determinism by seed,
guidance 1 = the conditional sampler, the text sampler's cache = the uncached loop, the VQA prefix and
the caption prompt, the `sample` command (outputs, a grid of a prompt file, exit code 2 on bad input)
and the in-training hook (its default and configured prompts).

The DiT's parameters are random, perturbed away from the AdaLN-Zero init (whose zero image head
would make every image sampler output prompt-independent)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unialignment_jax import cli, progress
from unialignment_jax import config as config_lib
from unialignment_jax.data import shapes
from unialignment_jax.data import shapes_tasks
from unialignment_jax.models import create
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
from unialignment_jax.objectives import text_diffusion
from unialignment_jax.parallel import mesh as mesh_lib
from unialignment_jax.parallel import rules as rules_lib
from unialignment_jax.sampling import image as image_lib
from unialignment_jax.sampling import grids, pipeline, prompts, restore, schedule
from unialignment_jax.sampling import text as text_lib
from unialignment_jax.training import encoders as encoders_lib

STEPS = pipeline.Settings(image_steps=3, text_steps=4)


def perturbed_params(config, mesh, rules, scale=0.05):
    """Random DiT params on the mesh, every leaf perturbed (so the zero-initialised heads act)."""
    graphdef, abstract = restore.dit_spec(config, mesh, rules)
    make = lambda: nnx.to_pure_dict(nnx.state(UniAlignmentDiT(DiTConfig.from_config(config.model),
                                                              rngs=nnx.Rngs(config.seed))))

    def init():
        with nnx.use_eager_sharding(False):
            params = make()
        leaves, tree = jax.tree.flatten(params)
        return jax.tree.unflatten(tree, [x + scale * jax.random.normal(jax.random.fold_in(jax.random.key(1), i),
                                                                       x.shape, x.dtype)
                                         for i, x in enumerate(leaves)])

    with create.sharding_context(mesh, rules):
        params = jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, abstract))()
    return graphdef, jax.block_until_ready(params)


def write_run(workdir, config, params):
    """A run directory as the trainer leaves it: config.json + a checkpoint of a train state."""
    from unialignment_jax.training import checkpoint, state as state_lib

    tx = state_lib.make_optimizer(config.optimizer)
    state = jax.block_until_ready(jax.jit(lambda p: state_lib.init_state(p, tx, config.seed, True))(params))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 2, async_save=False)
    ckpt.save(state, {"step": 0}, force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def tiny(repo_root):
    config_path = f"{repo_root}/experiments/demo.py:tiny"
    config = config_lib.load(config_path)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    frozen = encoders_lib.build_frozen(config, mesh, rules)
    graphdef, params = perturbed_params(config, mesh, rules)
    sampler = pipeline.Sampler(config, mesh, rules, frozen, graphdef)
    return dict(config=config, config_path=config_path, mesh=mesh, rules=rules, frozen=frozen, graphdef=graphdef,
                params=params, sampler=sampler)


# ----------------------------------------------------------------------------- schedule, Euler


@pytest.mark.parametrize("shift,steps", [(1.0, 4), (3.0, 1), (3.0, 5), (3.0, 50)])
def test_flow_sigmas_match_diffusers(shift, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    sigmas = schedule.flow_sigmas(steps, shift)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(schedule.flow_timesteps(sigmas), sched.timesteps.numpy())


def test_euler_cfg_loop_matches_diffusers_step():
    """euler_sample + guided_velocity against the official loop: cat([uncond, cond]) -> chunk ->
    v_u + w (v_c - v_u) -> scheduler.step, with a toy model that depends on x, t and the context."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 3)).astype(np.float32)
    neg = rng.standard_normal((2, 5, 3)).astype(np.float32)
    w, steps = 4.0, 6

    def toy(x, c, t):  # any smooth function of (x, context, timestep)
        return 0.7 * x - 0.5 * c.mean(1)[:, None, None, :] + (t / 1000.0)[:, None, None, None]

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x0)
    c2 = torch.from_numpy(np.concatenate([neg, ctx]))
    for t in sched.timesteps:
        v = toy(torch.cat([x, x]), c2, t.expand(4))
        v_u, v_c = v.chunk(2)
        x = sched.step(v_u + w * (v_c - v_u), t, x, return_dict=False)[0]

    velocity = image_lib.guided_velocity(lambda x, c, t, cond: toy(x, c, t), jnp.asarray(ctx), jnp.asarray(neg),
                                         None, jnp.float32(w), use_cfg=True)
    ours = jax.jit(lambda x, s: image_lib.euler_sample(velocity, x, s))(jnp.asarray(x0),
                                                                        jnp.asarray(schedule.flow_sigmas(steps, 3.0)))
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- image sampler


def test_t2i_shapes_and_determinism_by_seed(tiny):
    s, params = tiny["sampler"], tiny["params"]
    prompts = ["a large red circle at the center.", "a small blue square at the top left.", "Make it green."]
    a = s.generate(params, "t2i", prompts, settings=STEPS)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    b = s.generate(params, "t2i", prompts, settings=STEPS)
    np.testing.assert_array_equal(a, b)
    other = s.generate(params, "t2i", prompts, settings=pipeline.Settings(image_steps=3, seed=1))
    assert np.abs(other.astype(int) - a.astype(int)).mean() > 1
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 1  # prompts (and noise) differ
    # Example i's noise is keyed by (seed, index), not by its place in the batch.
    single = s.generate(params, "t2i", prompts[1:2], settings=STEPS, indices=[1])
    assert np.abs(single[0].astype(int) - a[1].astype(int)).max() <= 1


def test_guidance_one_equals_the_conditional_sampler(tiny):
    t, s = tiny, tiny["sampler"]
    fr = t["frozen"]
    ids = s.encode_texts(["a large red circle at the center."] * 8)
    neg = s.encode_texts([image_lib.NEGATIVE_PROMPT] * 8)
    sigmas = jnp.asarray(schedule.flow_sigmas(3, 3.0))
    put = s._batch
    args = (t["params"], fr.arrays["text"], fr.arrays["codec"], put(ids), put(neg), None, jnp.uint32(0),
            put(np.arange(8, dtype=np.int32)), sigmas)
    outs = {}
    with create.sharding_context(t["mesh"], t["rules"]):
        for use_cfg, w in ((True, 1.0), (False, 1.0), (True, 7.0)):
            fn = jax.jit(image_lib.build_image_sampler(t["graphdef"], fr.text_encoder, fr.codec_graphdef,
                                                       s.latent_shape, use_cfg))
            outs[use_cfg, w] = np.asarray(fn(*args, jnp.float32(w)))
    np.testing.assert_allclose(outs[True, 1.0], outs[False, 1.0], atol=2e-5)
    assert np.abs(outs[True, 7.0] - outs[False, 1.0]).mean() > 1e-2  # guidance does something


def test_edit_perception_compose_shapes_and_conditioning(tiny):
    s, params = tiny["sampler"], tiny["params"]
    exs = [shapes_tasks.make_example("edit", "validation", i) for i in range(2)]
    cond = np.stack([shapes.render(e.conds[0], 32) for e in exs])[:, None]
    out = s.generate(params, "edit", [e.instruction for e in exs], cond, settings=STEPS)
    assert out.shape == (2, 32, 32, 3)
    swapped = s.generate(params, "edit", [e.instruction for e in exs], cond[::-1], settings=STEPS)
    assert (swapped != out).any()  # the condition images matter (weakly, for a random model)
    assert s.generate(params, "perception", ["Provide a depth map of the scene."], cond[:1],
                      settings=STEPS).shape == (1, 32, 32, 3)
    ex = shapes_tasks.make_example("compose", "validation", 0)
    refs = np.stack([shapes.render(c, 32) for c in ex.conds])[None]
    assert refs.shape[1] == 3
    assert s.generate(params, "compose", [ex.instruction], refs, settings=STEPS).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="3 condition image"):
        s.generate(params, "compose", [ex.instruction], refs[:, :2], settings=STEPS)


# -------------------------------------------------------------------------------- text sampler


def test_masked_diffusion_loop_with_a_fixed_denoiser():
    """Pure loop: the prefix is copied, every other position ends filled (never MASK), tokens come
    from the denoiser's support, and a denoiser that never changes gives cached == uncached."""
    mask, vocab, length = 7, 8, 12
    logits = jnp.where(jnp.arange(vocab) < 3, 0.0, -30.0)  # support {0, 1, 2}
    denoise = lambda x: text_diffusion.subs_log_probs(jnp.broadcast_to(logits, x.shape + (vocab,)), x, mask)
    prefix = jnp.array([[5, 6, 1] + [0] * 9, [4] + [0] * 11], jnp.int32)
    x0 = text_lib.prefix_init(prefix, jnp.array([3, 1]), mask)
    keys = text_lib.example_keys(jnp.uint32(0), jnp.arange(2))
    run = jax.jit(text_lib.masked_diffusion_sample, static_argnums=(0, 3, 4))
    cached, calls_c = run(denoise, x0, keys, 16, mask, True)
    plain, calls_u = run(denoise, x0, keys, 16, mask, False)
    np.testing.assert_array_equal(cached, plain)
    assert int(calls_u) == 17 and int(calls_c) < 17
    out = np.asarray(cached)
    assert list(out[0, :3]) == [5, 6, 1] and out[1, 0] == 4
    assert set(out[0, 3:]) | set(out[1, 1:]) <= {0, 1, 2}


def chain_denoiser(mask, vocab):
    """A denoiser that knows a position only next to a known one: after a known token v it predicts
    v + 1 (mod vocab - 1) with log-prob about -0.01; elsewhere a flat guess (about -2.0)."""
    def denoise(x):
        prev = jnp.concatenate([jnp.full_like(x[:, :1], mask), x[:, :-1]], axis=1)
        nxt = (prev + 1) % (vocab - 1)
        sure = jax.nn.one_hot(nxt, vocab) * 10.0
        logits = jnp.where((prev != mask)[..., None], sure, jnp.zeros(x.shape + (vocab,)))
        return text_diffusion.subs_log_probs(logits, x, mask)
    return denoise


def test_confidence_order_grows_from_the_anchor():
    """The confidence order fills the position next to what is known first, so a chain grows from
    the prefix (3, 4, 5, ...); the official random order places guesses anywhere. Every free
    position ends filled, the given ones are copied, and caching changes nothing."""
    mask, vocab, length = 9, 10, 10
    denoise = chain_denoiser(mask, vocab)
    prefix = jnp.array([[2] + [0] * 9, [6, 7] + [0] * 8], jnp.int32)
    x0 = text_lib.prefix_init(prefix, jnp.array([1, 2]), mask)
    keys = text_lib.example_keys(jnp.uint32(0), jnp.arange(2))
    run = jax.jit(text_lib.confidence_sample, static_argnums=(0, 3, 4, 6))
    out, calls = run(denoise, x0, keys, length, mask, True, 0.0)
    np.testing.assert_array_equal(out, [[2, 3, 4, 5, 6, 7, 8, 0, 1, 2], [6, 7, 8, 0, 1, 2, 3, 4, 5, 6]])
    plain, calls_u = run(denoise, x0, keys, length, mask, False, 0.0)
    np.testing.assert_array_equal(plain, out)
    assert int(calls_u) == length and int(calls) < length  # row 1 (8 free) skips some of the 10 steps
    # fewer steps than free positions: several per step, still every one filled, most confident first
    few, _ = run(denoise, x0, keys, 3, mask, True, 0.0)
    few = np.asarray(few)
    assert not (few == mask).any() and few[0, :2].tolist() == [2, 3] and few[1, :3].tolist() == [6, 7, 8]
    # a temperature draws: seeds differ, the given prefix stays
    hot_a, _ = run(denoise, x0, keys, length, mask, True, 50.0)
    hot_b, _ = run(denoise, x0, text_lib.example_keys(jnp.uint32(1), jnp.arange(2)), length, mask, True, 50.0)
    assert (np.asarray(hot_a) != np.asarray(hot_b)).any() and np.asarray(hot_b)[1, :2].tolist() == [6, 7]
    rand, _ = jax.jit(text_lib.masked_diffusion_sample, static_argnums=(0, 3, 4))(denoise, x0, keys, length, mask)
    assert (np.asarray(rand) != np.asarray(out)).any()


@pytest.mark.parametrize("order,temperature,uncached_calls", [("random", 0.0, 41), ("confidence", 1.0, 40)])
def test_text_sampler_cache_equals_uncached_loop(tiny, order, temperature, uncached_calls):
    """Both orders on the tiny model: cached = uncached, fewer model calls, nothing left masked, the
    same seed gives the same text and another seed another (the confidence order's draws at
    temperature 1; at 0 it is deterministic)."""
    s, params = tiny["sampler"], tiny["params"]
    images = np.stack([shapes.render(shapes_tasks.make_example("caption", "validation", i).target, 32)
                       for i in range(3)])
    # more steps than tokens: many steps change nothing
    settings = pipeline.Settings(text_steps=40, text_order=order, text_temperature=temperature)
    ids_c, _, calls_c = s.describe_ids(params, "caption", images, settings=settings, use_cache=True)
    ids_u, _, calls_u = s.describe_ids(params, "caption", images, settings=settings, use_cache=False)
    np.testing.assert_array_equal(ids_c, ids_u)
    assert calls_u == uncached_calls and calls_c < calls_u
    assert not (ids_c == tiny["frozen"].tokenizer.mask_id).any()
    again, _, _ = s.describe_ids(params, "caption", images, settings=settings)
    np.testing.assert_array_equal(again, ids_c)
    other, _, _ = s.describe_ids(params, "caption", images, settings=dataclasses.replace(settings, seed=3))
    assert (other != ids_c).any()


def test_vqa_keeps_its_question_prefix(tiny):
    s, params = tiny["sampler"], tiny["params"]
    exs = [shapes_tasks.make_example("vqa", "validation", i) for i in range(3)]
    images = np.stack([shapes.render(e.target, 32) for e in exs])
    questions = [e.question for e in exs]
    ids, prefix_len, _ = s.describe_ids(params, "vqa", images, questions, settings=STEPS)
    tok = tiny["frozen"].tokenizer
    for row, n, q in zip(ids, prefix_len, questions):
        want = tok.encode([q], 32)[0]
        assert n == pipeline.num_tokens(want, tok.eos_id) and want[n - 1] == tok.eos_id
        np.testing.assert_array_equal(row[:n], want[:n])
    assert len(s.decode(ids, prefix_len)) == 3
    with pytest.raises(ValueError, match="one question per image"):
        s.describe_ids(params, "vqa", images, questions[:2], settings=STEPS)


def test_caption_prompt_is_a_given_prefix(tiny):
    """The demo's input.caption_prompt is given like a VQA question (copied, dropped from the decoded
    caption); with caption_prompt "" (official) the caption is sampled from an all-MASK sequence."""
    s, params, tok = tiny["sampler"], tiny["params"], tiny["frozen"].tokenizer
    prompt = tiny["config"].input.caption_prompt
    assert prompt
    images = np.stack([shapes.render(shapes_tasks.make_example("caption", "validation", i).target, 32)
                       for i in range(2)])
    ids, prefix_len, _ = s.describe_ids(params, "caption", images, settings=STEPS)
    want = tok.encode([prompt], 32)[0]
    n = pipeline.num_tokens(want, tok.eos_id)
    assert list(prefix_len) == [n, n]
    np.testing.assert_array_equal(ids[:, :n], np.repeat(want[None, :n], 2, 0))
    texts = s.describe(params, "caption", images, settings=STEPS)
    assert texts == s.decode(ids, prefix_len) and not any(t.startswith(prompt) for t in texts)

    official = config_lib.load(f"{tiny['config_path']}")
    official.input.caption_prompt = ""
    plain = pipeline.Sampler(official, tiny["mesh"], tiny["rules"], tiny["frozen"], tiny["graphdef"])
    ids0, prefix0, _ = plain.describe_ids(params, "caption", images, settings=STEPS)
    assert list(prefix0) == [0, 0] and not (ids0 == tok.mask_id).any()

    official.input.caption_prompt = " ".join(["What shapes?"] * 11)  # 33 tokens: nothing left to sample
    with pytest.raises(ValueError, match="input.caption_prompt fills the whole 32-token text"):
        pipeline.Sampler(official, tiny["mesh"], tiny["rules"], tiny["frozen"], tiny["graphdef"]).describe_ids(
            params, "caption", images, settings=STEPS)


# -------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sample_run"))
    write_run(workdir, tiny["config"], tiny["params"])
    return workdir


def test_read_config_round_trips_the_run_config(run_dir, tiny):
    config = restore.read_config(run_dir)
    assert list(config.stages.keys()) == list(tiny["config"].stages.keys()) == ["generation", "editing", "unified"]
    assert config.to_dict() == tiny["config"].to_dict()


def test_sample_command_writes_png_and_text(run_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert cli.main(["sample", "--workdir", run_dir, "--task", "t2i", "--prompt", "a large red circle at the center.",
                     "--steps", "2", "--out", str(out)]) == 0
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    txt = tmp_path / "q.txt"
    assert cli.main(["sample", "--workdir", run_dir, "--task", "vqa", "--prompt", "What colour is the circle?",
                     "--image", str(out), "--steps", "3", "--ema", "--out", str(txt)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert txt.read_text().strip() == printed.strip()


GRID_PROMPTS = ["a large red circle at the center.", "a small blue square at the top left.",
                "a large green triangle at the bottom."]


def test_sample_command_grid_of_a_prompt_file(run_dir, tiny, tmp_path, capsys, monkeypatch):
    """--prompts: one PNG, cell j = the batched sampler's image of line j; the forced progress bar
    counts the images."""
    from PIL import Image

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(GRID_PROMPTS[:2]) + "\n\n" + GRID_PROMPTS[2] + "\n")  # a blank line is skipped
    out = tmp_path / "grid.png"
    monkeypatch.setenv(progress.ENV, "1")
    assert cli.main(["sample", "--workdir", run_dir, "--task", "t2i", "--prompts", str(prompt_file),
                     "--steps", "3", "--out", str(out)]) == 0
    assert "sample t2i: 100%" in capsys.readouterr().err
    img = np.asarray(Image.open(out))
    assert img.shape == (2 + 34, 2 + 3 * 34, 3)  # one row of three 32 px cells, 2 px apart
    expected = tiny["sampler"].generate(tiny["params"], "t2i", GRID_PROMPTS, settings=STEPS)
    for j in range(3):
        np.testing.assert_array_equal(img[2:34, 2 + 34 * j:34 + 34 * j], expected[j])


def test_configured_sample_prompts():
    assert prompts.from_config("") is None
    assert prompts.from_config(" a red circle. | a blue square. |") == ["a red circle.", "a blue square."]
    with pytest.raises(prompts.PromptError, match="config.sample.prompts = 'nowhere/p.txt': cannot read"):
        prompts.from_config("nowhere/p.txt")
    with pytest.raises(prompts.PromptError, match="no prompts"):
        prompts.from_config(" | ")


@pytest.mark.parametrize("case", ["no_workdir", "no_checkpoint", "image_count", "unreadable", "no_question",
                                  "bad_step", "prompts_file", "prompts_task"])
def test_sample_command_bad_input_exits_2(case, run_dir, tmp_path, capsys):
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    (empty_run / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    args = {
        "no_workdir": ["--workdir", str(tmp_path / "nope"), "--task", "t2i", "--prompt", "x"],
        "no_checkpoint": ["--workdir", str(empty_run), "--task", "t2i", "--prompt", "x"],
        "image_count": ["--workdir", run_dir, "--task", "compose", "--prompt", "x", "--image", str(png)],
        "unreadable": ["--workdir", run_dir, "--task", "edit", "--prompt", "x", "--image", str(bad)],
        "no_question": ["--workdir", run_dir, "--task", "vqa", "--image", str(png)],
        "bad_step": ["--workdir", run_dir, "--task", "caption", "--image", str(png), "--step", "7"],
        "prompts_file": ["--workdir", run_dir, "--task", "t2i", "--prompts", str(tmp_path / "none.txt")],
        "prompts_task": ["--workdir", run_dir, "--task", "edit", "--prompts", str(bad), "--image", str(png)],
    }[case]
    assert cli.main(["sample", *args, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unialignment sample: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_sample_hook_writes_grid_and_captions(tiny, tmp_path):
    from unialignment_jax.sampling.hook import make_sample_hook

    class Writer:
        images, texts = {}, {}

        def write_images(self, step, images):
            self.images[step] = images

        def write_texts(self, step, texts):
            self.texts[step] = texts

    hook = make_sample_hook(tiny["config"], tiny["frozen"], tiny["mesh"], tiny["rules"], num_images=2,
                            num_captions=2, settings=pipeline.Settings(image_steps=2, text_steps=3))
    writer = Writer()
    hook(7, tiny["params"], writer, str(tmp_path))
    grid = writer.images[7]["samples/grid"]
    assert grid.dtype == np.uint8 and grid.shape[0] > 5 * 128  # 5 rows of enlarged 32 px cells
    assert (tmp_path / "samples" / "step_7.png").exists()
    assert "caption 1:" in writer.texts[7]["samples/captions"]


def test_sample_hook_draws_the_configured_prompts(tiny, tmp_path):
    """config.sample.prompts (a .txt file) replaces the Shapes defaults; sample.steps / sample.cfg
    are the image sampler's settings."""
    from unialignment_jax.sampling.hook import make_sample_hook

    class Writer:
        def write_images(self, step, images):
            self.image = images["samples/grid"]

        def write_texts(self, step, texts):
            self.text = texts["samples/captions"]

    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("\n".join(GRID_PROMPTS[:2]) + "\n")
    config = config_lib.load(tiny["config_path"], [f"--config.sample.prompts={prompt_file}",
                                                   "--config.sample.steps=3", "--config.sample.cfg=7.0"])
    hook = make_sample_hook(config, tiny["frozen"], tiny["mesh"], tiny["rules"], num_captions=1)
    writer = Writer()
    hook(3, tiny["params"], writer, str(tmp_path))
    assert writer.image.shape == (2 + 130, 2 + 2 * 130, 3)  # one row of two cells enlarged to 128 px
    expected = tiny["sampler"].generate(tiny["params"], "t2i", GRID_PROMPTS[:2], settings=STEPS)
    np.testing.assert_array_equal(writer.image[2:130, 132:260], grids.enlarge(expected[1]))
    assert f"t2i 1: {GRID_PROMPTS[1]}" in writer.text and "caption of t2i 0:" in writer.text
    assert "edit 0:" not in writer.text
