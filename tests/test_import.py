"""`unialignment import`: a tiny random diffusers SD3Transformer2DModel folder becomes a run whose
shared backbone computes what diffusers computes (every block's hidden states and the image
velocity, 1e-5), with a report of copied / transformed / re-initialised / dropped tensors, and
that `unialignment train` resumes; wrong, truncated and mismatched checkpoints fail with errors
naming the file or tensor, before anything is written."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests.test_export import restored  # noqa: E402
from unialignment_jax import cli  # noqa: E402
from unialignment_jax import config as config_lib  # noqa: E402
from unialignment_jax.interop import convert, export_files, import_mapping, sd3_names, streaming  # noqa: E402
from unialignment_jax.interop.convert import CheckpointMismatch  # noqa: E402
from unialignment_jax.interop.safetensors_io import Checkpoint, CheckpointFormatError  # noqa: E402
from unialignment_jax.interop.safetensors_write import save_file  # noqa: E402
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = f"{ROOT}/experiments/demo.py:tiny"
# The demo's tiny model (2 blocks, width 128, patch 1, T5 width 64, pixel-codec channels 48) with SD3's
# 256-d timestep sinusoid, computed exactly as diffusers does (no float16 rounding).
OVERRIDES = ["--config.model.timestep_dim=256", "--config.model.timestep_fp16_round=False",
             "--config.stages.generation.steps=1", "--config.stages.editing.steps=1",
             "--config.stages.unified.steps=1", "--config.checkpoint_every=3"]
SD3_ARGS = dict(sample_size=8, patch_size=1, in_channels=48, num_layers=2, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=int(config_lib.load(SPEC).model.context_dim),
                caption_projection_dim=128, pooled_projection_dim=32,
                out_channels=48, pos_embed_max_size=12)


def random_sd3(path=None, seed=0, **overrides):
    """A diffusers SD3 transformer with every parameter random (none of the zero inits)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**SD3_ARGS, **overrides}).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            fan_in = p.shape[1] if p.ndim > 1 else 10
            p.copy_(torch.randn_like(p) / fan_in**0.5)
    if path is not None:
        model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    sd3 = random_sd3(root / "sd3")
    workdir = root / "run"
    rc = cli.main(["import", "--source", str(root / "sd3"), "--config", SPEC, "--workdir", str(workdir),
                   "--log_level", "WARNING", *OVERRIDES])
    assert rc == 0
    return dict(root=root, sd3=sd3, workdir=workdir)


def our_blocks(model, latents, context, t):
    """(image, text) hidden states after every block, and the velocity."""
    img, txt = model.embed_image(latents), model.context_embedder(context)
    act = jax.nn.silu(model.embed_timestep(t))
    graphdef, stacked = nnx.split(model.blocks)
    outs = []
    for i in range(model.cfg.num_layers):
        img, txt = nnx.merge(graphdef, jax.tree.map(lambda x: x[i], stacked))(img, txt, act)
        outs.append((np.asarray(img), np.asarray(txt)))
    return outs, np.asarray(model(latents, context, t)["velocity"])


def test_sd3_import_matches_diffusers_and_reports(sd3_run):
    report = json.loads((sd3_run["workdir"] / "import_report.json").read_text())
    assert report["kind"] == "sd3"
    fresh = sorted(report["reinitialised"])
    assert fresh == sorted(
        [f"transformer_blocks.1.{m}.{p}" for m in ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")
         for p in ("weight", "bias")]
        + ["text_proj_out.weight", "text_proj_out.bias", "null_image_embd"]
        + [f"siglip_adapter_{s}.fc.{j}.{p}" for s in ("img", "text") for j in (0, 2) for p in ("weight", "bias")])
    assert sorted(t.split(" ")[0] for t in report["transformed"]) == [
        "transformer_blocks.1.norm1_context.linear.bias", "transformer_blocks.1.norm1_context.linear.weight"]
    assert sorted(report["dropped"]) == sorted(f"time_text_embed.text_embedder.linear_{j}.{p}"
                                               for j in (1, 2) for p in ("weight", "bias"))
    assert sorted(r.split(" -> ")[1] for r in report["renamed"]) == [
        "image_norm_out.linear.bias", "image_norm_out.linear.weight", "image_proj_out.bias", "image_proj_out.weight"]

    model, cfg, params, step = restored(sd3_run["workdir"])
    assert step == 0 and not cfg.timestep_fp16_round
    sd3 = sd3_run["sd3"]
    with torch.no_grad():  # SD3 without its pooled-text term: our conditioning
        sd3.time_text_embed.text_embedder.linear_2.weight.zero_()
        sd3.time_text_embed.text_embedder.linear_2.bias.zero_()
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o)) for b in sd3.transformer_blocks]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 6, 8, 48)).astype(np.float32)  # a non-square grid: the table's crop
    context = rng.standard_normal((2, 7, SD3_ARGS["joint_attention_dim"])).astype(np.float32)
    t = np.array([731.0, 12.0], np.float32)
    with torch.no_grad():
        theirs = sd3(hidden_states=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                     encoder_hidden_states=torch.from_numpy(context), timestep=torch.from_numpy(t),
                     pooled_projections=torch.randn(2, 32)).sample.numpy().transpose(0, 2, 3, 1)
    for h in hooks:
        h.remove()
    blocks, velocity = our_blocks(model, jnp.asarray(latents), jnp.asarray(context), jnp.asarray(t))
    for i, ((img, txt), (their_txt, their_img)) in enumerate(zip(blocks, captured)):
        np.testing.assert_allclose(img, their_img.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"block {i} image")
        if their_txt is not None:  # SD3's last block has no text output
            np.testing.assert_allclose(txt, their_txt.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"block {i} text")
    np.testing.assert_allclose(velocity, theirs, rtol=1e-5, atol=1e-5)
    assert np.abs(velocity).max() > 0.1

    # The last block's text modulation: SD3's shift/scale, zero gates and MLP shift/scale.
    mod = np.asarray(params["blocks"]["txt"]["modulation"]["kernel"][1])  # (in, 6, dim)
    sd3_ctx = sd3.transformer_blocks[1].norm1_context.linear.weight.detach().numpy()  # (2 dim, in): scale; shift
    np.testing.assert_array_equal(mod[:, 0].T, sd3_ctx[128:])
    np.testing.assert_array_equal(mod[:, 1].T, sd3_ctx[:128])
    assert not mod[:, 2:].any()
    # Re-initialised tensors are what a fresh run with the config's seed starts from.
    from unialignment_jax import config as config_lib

    config = config_lib.load(SPEC, OVERRIDES)
    make = lambda: UniAlignmentDiT(DiTConfig.from_config(config.model), rngs=nnx.Rngs(config.seed))
    with nnx.use_eager_sharding(False):
        fresh = jax.jit(lambda: nnx.state(make(), nnx.Param))()
    np.testing.assert_array_equal(np.asarray(params["text_proj_out"]["kernel"]),
                                  np.asarray(fresh["text_proj_out"]["kernel"][...]))


def test_train_resumes_from_the_imported_run(sd3_run):
    workdir = sd3_run["root"] / "resumed"
    shutil.copytree(sd3_run["workdir"], workdir)
    rc = cli.main(["train", "--config", SPEC, "--workdir", str(workdir), "--log_level", "WARNING", *OVERRIDES])
    assert rc == 0
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps[-1] == 3
    assert sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == [0, 3]
    # Importing into a run that already has checkpoints is refused.
    assert cli.main(["import", "--source", str(sd3_run["root"] / "sd3"), "--config", SPEC, "--workdir",
                     str(workdir), *OVERRIDES]) == 2


# ----------------------------------------------------------------------------- bad sources

CFG = DiTConfig(num_layers=2, num_heads=2, head_dim=8, in_channels=4, out_channels=4, sample_size=8,
                pos_embed_max_size=12, context_dim=12, vocab_size=30, timestep_dim=256, block_depth=1,
                adapter_hidden=10, adapter_out=6, timestep_fp16_round=False)


def load(path, cfg=CFG, **kw):
    make = lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0))
    _, abstract = streaming.abstract_model(make)
    return import_mapping.load_params(str(path), cfg, abstract, make, **kw)


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """An official-layout checkpoint of a small random model, and its parameters."""
    root = tmp_path_factory.mktemp("official")
    make = lambda: UniAlignmentDiT(CFG, rngs=nnx.Rngs(0))
    _, abstract = streaming.abstract_model(make)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(abstract))

    @jax.jit
    def draw():
        keys = jax.random.split(jax.random.key(7), len(leaves))
        return [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]

    params = jax.tree.unflatten(treedef, draw())
    os.makedirs(root / "ckpt")
    export_files.write_official(params, CFG, str(root / "ckpt"), {"source_step": 0, "ema": False})
    (root / "ckpt" / "config.json").write_text(json.dumps(export_files.official_config(CFG)))
    return root / "ckpt", params


def rewrite(src_dir, dst_dir, edit):
    """Copy an official checkpoint folder, editing its tensors dict with `edit(dict)`."""
    ckpt = Checkpoint(str(src_dir), (sd3_names.DIFFUSERS_WEIGHTS,))
    tensors = {k: np.array(ckpt.array(k)) for k in ckpt.keys()}
    edit(tensors)
    os.makedirs(dst_dir)
    save_file(os.path.join(dst_dir, sd3_names.DIFFUSERS_WEIGHTS), tensors)
    return dst_dir


def test_official_import_is_exact_and_mismatches_are_named(official_dir, tmp_path):
    path, params = official_dir
    values, report = load(path)
    assert report.kind == "official" and not report.reinitialised and not report.dropped
    flat = convert.flatten(params)
    for k, v in flat.items():
        np.testing.assert_array_equal(np.asarray(values[k]), np.asarray(v), err_msg=k)

    key = "transformer_blocks.1.attn.to_k.bias"
    missing = rewrite(path, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointMismatch, match=f"missing tensors: {key}"):
        load(missing)
    values, report = load(missing, allow_missing=True)
    assert report.reinitialised == [key]
    fresh = np.zeros_like(np.asarray(values["blocks/img/qkv/bias"][1, 1]))  # biases start at zero
    np.testing.assert_array_equal(np.asarray(values["blocks/img/qkv/bias"][1, 1]), fresh)
    np.testing.assert_array_equal(np.asarray(values["blocks/img/qkv/bias"][1, 0]),
                                  np.asarray(flat["blocks/img/qkv/bias"][1, 0]))

    extra = rewrite(path, tmp_path / "extra", lambda t: t.update({"lm_head.weight": np.zeros((3, 3), np.float32)}))
    with pytest.raises(CheckpointMismatch, match="unexpected tensors: lm_head.weight"):
        load(extra)
    _, report = load(extra, allow_unexpected=True)
    assert report.dropped[0].startswith("lm_head.weight")

    bad_key = "transformer_blocks.0.ff.net.2.weight"
    shaped = rewrite(path, tmp_path / "shaped", lambda t: t.update({bad_key: np.zeros((16, 32), np.float32)}))
    with pytest.raises(CheckpointMismatch, match=rf"mis-shaped tensors: {bad_key}: \[16, 32\], the model "
                                                 r"expects \[16, 64\]"):
        load(shaped, allow_missing=True, allow_unexpected=True)  # never allowed

    # A different model: the config.json next to the weights is checked first.
    with pytest.raises(CheckpointMismatch, match="num_attention_heads = 2 .*model.num_heads = 4"):
        load(path, dataclasses.replace(CFG, num_heads=4, head_dim=4))


def test_wrong_and_truncated_files_are_named(official_dir, tmp_path):
    path, _ = official_dir
    weights = path / sd3_names.DIFFUSERS_WEIGHTS
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match=f"{truncated}.*truncated"):
        load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointFormatError, match=str(garbage)):
        load(garbage)
    pickle_dir = tmp_path / "pickles"
    pickle_dir.mkdir()
    (pickle_dir / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointFormatError, match="pickle"):
        load(pickle_dir)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing")

    # An SD3 folder of another size, with and without its config.json.
    wide = tmp_path / "wide"
    random_sd3(wide, in_channels=4, out_channels=4, joint_attention_dim=12, num_attention_heads=2,
               attention_head_dim=16)
    with pytest.raises(CheckpointMismatch, match="attention_head_dim = 16"):
        load(wide)
    os.remove(wide / "config.json")
    with pytest.raises(CheckpointMismatch, match=r"mis-shaped tensors: .*context_embedder.weight: \[128, 12\], the "
                                                 r"model expects \[16, 12\]"):
        load(wide)
    # Another sample_size gives another position table: caught from the stored table.
    other = tmp_path / "other_sample"
    random_sd3(other, sample_size=16, in_channels=4, out_channels=4, joint_attention_dim=12, num_attention_heads=2,
               attention_head_dim=8)
    os.remove(other / "config.json")
    with pytest.raises(CheckpointMismatch, match="position table"):
        load(other)
    # From the command line: exit 2, and the run directory is not created.
    workdir = tmp_path / "never"
    assert cli.main(["import", "--source", str(truncated), "--config", SPEC, "--workdir", str(workdir),
                     *OVERRIDES]) == 2
    assert not workdir.exists()


def test_streams_onto_the_mesh_and_keeps_bfloat16_bits(official_dir, mesh_222, tmp_path):
    from unialignment_jax.models import create
    from unialignment_jax.parallel import rules as rules_lib

    path, params = official_dir
    rules = rules_lib.get_rules("fsdp_tp")
    make = lambda: UniAlignmentDiT(CFG, rngs=nnx.Rngs(0))
    _, abstract = create.abstract_state(make, mesh_222, rules)
    values, _ = import_mapping.load_params(str(path), CFG, abstract, make, mesh=mesh_222, rules=rules)
    flat_abstract = streaming.flat_leaves(abstract)
    for k, v in convert.flatten(params).items():
        assert values[k].sharding == flat_abstract[k].sharding, k
        np.testing.assert_array_equal(np.asarray(values[k]), np.asarray(v), err_msg=k)
    assert any(len({str(s.index) for s in v.addressable_shards}) > 1 for v in values.values())  # really sharded

    # bfloat16 parameters leave as float32 (exactly) and come back bit for bit.
    cfg16 = dataclasses.replace(CFG, param_dtype="bfloat16")
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    os.makedirs(tmp_path / "bf16")
    export_files.write_official(bf16, cfg16, str(tmp_path / "bf16"), {"source_step": 0, "ema": False})
    values, _ = load(tmp_path / "bf16", cfg16)
    for k, v in convert.flatten(bf16).items():
        assert values[k].dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(np.asarray(values[k]).view(np.uint16), np.asarray(v).view(np.uint16), err_msg=k)
