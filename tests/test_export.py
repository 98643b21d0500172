"""`unialignment export` of a tiny trained run: the official layout loads strictly into the PyTorch
reference of the official class and reproduces our outputs (t2i, edit) to 1e-5 in float32; the
diffusers layout loads into diffusers' SD3Transformer2DModel and reproduces our image velocity;
EMA / step selection and metadata; import(export(x)) == x bit for bit (both layouts, and EMA);
a failed export leaves nothing at --out."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests.test_model_parity import run_both  # noqa: E402
from tests.torch_reference import UniAlignmentReference  # noqa: E402
from unialignment_jax import cli  # noqa: E402
from unialignment_jax import config as config_lib  # noqa: E402
from unialignment_jax.interop import convert, export, import_weights, sd3_names, streaming  # noqa: E402
from unialignment_jax.data.shapes import VOCABULARY  # noqa: E402
from unialignment_jax.interop.safetensors_io import Checkpoint, SafetensorsFile  # noqa: E402
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT  # noqa: E402
from unialignment_jax.training import checkpoint as checkpoint_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = f"{ROOT}/experiments/demo.py:tiny"
# Two blocks of width 128; timestep_dim 256 so that the diffusers SD3 layout applies.
OVERRIDES = ["--config.stages.generation.steps=2", "--config.stages.editing.steps=1",
             "--config.stages.unified.steps=1", "--config.checkpoint_every=2", "--config.model.timestep_dim=256"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained 4 steps (checkpoints at 2 and 4, EMA on), with a mask-token row file."""
    root = tmp_path_factory.mktemp("export")
    width = int(config_lib.load(SPEC).text_encoder.d_model)  # the mask row is one T5 embedding row
    row = np.random.default_rng(0).standard_normal(width).astype(np.float32)
    np.save(root / "mask_row.npy", row)
    workdir = root / "run"
    overrides = OVERRIDES + [f"--config.text_encoder.mask_embedding={root / 'mask_row.npy'}"]
    rc = cli.main(["train", "--config", SPEC, "--workdir", str(workdir), "--log_level", "WARNING", *overrides])
    assert rc == 0
    return dict(root=root, workdir=workdir, overrides=overrides, mask_row=row)


def restored(workdir, ema=False, step=None):
    """(our model with the run's weights on one device, DiTConfig, pure params, step)."""
    config = export.load_run_config(str(workdir))
    cfg = DiTConfig.from_config(config.model)
    make = lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0))
    graphdef, abstract = streaming.abstract_model(make)
    params, step, _ = checkpoint_lib.restore_params(os.path.join(workdir, "checkpoints"), nnx.to_pure_dict(abstract),
                                                    ema=ema, step=step)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract), cfg, params, step


def export_cli(workdir, out, *extra):
    return cli.main(["export", "--workdir", str(workdir), "--out", str(out), "--log_level", "WARNING", *extra])


def reference_from_export(out):
    with open(out / "transformer" / "config.json") as f:
        c = json.load(f)
    assert c["_class_name"] == "SD3JointModelFlexible"
    import inspect

    args = {k: v for k, v in c.items() if k in inspect.signature(UniAlignmentReference.__init__).parameters}
    ref = UniAlignmentReference(**args).eval()
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")), strict=True)
    return ref, c


def bits(x):
    x = np.asarray(jax.device_get(x))
    return x.view(np.uint8)


def assert_params_bit_equal(a, b):
    fa, fb = convert.flatten(a), convert.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
        np.testing.assert_array_equal(bits(fa[k]), bits(fb[k]), err_msg=k)


def test_official_export_loads_strictly_and_matches_reference(run_dir, tmp_path):
    out = tmp_path / "official"
    assert export_cli(run_dir["workdir"], out) == 0
    ref, c = reference_from_export(out)  # load_state_dict(strict=True) inside
    assert c["vocab_size"] == 175 and c["num_layers"] == 2 and c["caption_projection_dim"] == 128
    assert c["_unialignment_export"] == {"source_step": 4, "ema": False, "format": "official"}
    model, cfg, _, _ = restored(run_dir["workdir"])
    for task in ("t2i", "edit"):
        ours, theirs = run_both(cfg, model, ref, task)
        for k in ("velocity", "text_logits", "image_hidden", "text_hidden"):
            np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-5, err_msg=f"{task}: {k}")
        assert np.abs(ours["velocity"]).max() > 0  # the trained image head is not the zero init

    info = json.loads((out / "export_info.json").read_text())
    assert info["source_step"] == 4 and info["ema"] is False and info["format"] == "official"
    meta = SafetensorsFile(str(out / "transformer" / "diffusion_pytorch_model.safetensors")).metadata
    assert meta["unialignment_source_step"] == "4" and meta["unialignment_ema"] == "false"
    # The mask-token row the run's T5 used, the tokenizer and the scheduler settings.
    mask = SafetensorsFile(str(out / "mask_token_emb.safetensors"))
    np.testing.assert_array_equal(mask.array("mask_token_emb"), run_dir["mask_row"])
    tok = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    # The demo's word tokenizer has no HF class: its vocabulary is written out.
    assert tok["tokenizer_class"] is None and tok["model_max_length"] == 32 and tok["pad_token"] == "</s>"
    assert tok["unialignment"]["mask_token_id"] == 75 and tok["unialignment"]["kind"] == "words"
    assert tok["unialignment"]["vocabulary"] == list(VOCABULARY)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "scheduler"))
    assert sched.config.shift == 3.0 and sched.config.num_train_timesteps == 1000
    # The released class hard-codes sizes this toy model does not have: said in the notes.
    assert any("adapters 128->128->64" in n for n in info["notes"])


def test_ema_and_step_are_selected_and_recorded(run_dir, tmp_path):
    out = tmp_path / "ema2"
    assert export_cli(run_dir["workdir"], out, "--ema", "--step", "2") == 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["source_step"] == 2 and info["ema"] is True
    assert SafetensorsFile(str(out / "transformer" / "diffusion_pytorch_model.safetensors")).metadata[
        "unialignment_ema"] == "true"
    _, cfg, ema2, _ = restored(run_dir["workdir"], ema=True, step=2)
    _, _, raw4, _ = restored(run_dir["workdir"])
    ckpt = Checkpoint(str(out / "transformer"), (sd3_names.DIFFUSERS_WEIGHTS,))
    want = convert.to_official(ema2, cfg)
    assert set(ckpt.keys()) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(ckpt.array(k)), v, err_msg=k)
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not np.array_equal(want[key], convert.to_official(raw4, cfg)[key])


def test_diffusers_export_is_an_sd3_transformer(run_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "diffusers"
    assert export_cli(run_dir["workdir"], out, "--format", "diffusers") == 0
    sd3 = SD3Transformer2DModel.from_pretrained(str(out / "transformer")).eval()  # no missing / unexpected keys
    extra = SafetensorsFile(str(out / "transformer" / sd3_names.EXTRA_WEIGHTS))
    assert sorted(extra.keys()) == sorted([
        "null_image_embd", "text_proj_out.weight", "text_proj_out.bias",
        *[f"siglip_adapter_{s}.fc.{j}.{p}" for s in ("img", "text") for j in (0, 2) for p in ("weight", "bias")],
        *[f"transformer_blocks.1.{m}.{p}" for m in ("norm1_context.linear", "attn.to_add_out", "ff_context.net.0.proj",
                                                    "ff_context.net.2") for p in ("weight", "bias")]])
    # SD3's conditioning is the timestep embedding alone (zero pooled projection); it computes the
    # sinusoid in float32, so compare with this model's exact-sinusoid variant.
    model, cfg, _, _ = restored(run_dir["workdir"])
    exact = dataclasses.replace(cfg, timestep_fp16_round=False)
    model.cfg = exact
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 6, 8, cfg.in_channels)).astype(np.float32)
    context = rng.standard_normal((2, 7, cfg.context_dim)).astype(np.float32)
    t = np.array([731.0, 12.0], np.float32)
    ours = np.asarray(model(jax.numpy.asarray(latents), jax.numpy.asarray(context), jax.numpy.asarray(t))["velocity"])
    with torch.no_grad():
        theirs = sd3(hidden_states=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                     encoder_hidden_states=torch.from_numpy(context), timestep=torch.from_numpy(t),
                     pooled_projections=torch.randn(2, sd3.config.pooled_projection_dim)).sample.numpy()
    np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    info = json.loads((out / "export_info.json").read_text())
    assert any("float16" in n for n in info["notes"])


@pytest.mark.parametrize("fmt,ema", [("official", False), ("diffusers", False), ("official", True)])
def test_import_of_export_is_bit_exact(run_dir, tmp_path, fmt, ema):
    out = tmp_path / "out"
    assert export_cli(run_dir["workdir"], out, "--format", fmt, *(["--ema"] if ema else [])) == 0
    config = config_lib.load(SPEC, run_dir["overrides"])
    report = import_weights.import_run(str(out), config, str(tmp_path / "again"))
    assert not report.reinitialised
    assert all(k.startswith(sd3_names.TEXT_EMBEDDER) for k in report.dropped)  # diffusers: SD3's zero text embedder
    _, _, original, _ = restored(run_dir["workdir"], ema=ema)
    _, _, again, step = restored(tmp_path / "again")
    assert step == 0
    assert_params_bit_equal(original, again)


def break_export_half_way(monkeypatch):
    """Make the 21st tensor of an export fail ("disk full")."""
    real = convert.iter_official

    def breaks_half_way(params, cfg):
        for n, item in enumerate(real(params, cfg)):
            if n == 20:
                raise RuntimeError("disk full")
            yield item

    monkeypatch.setattr(convert, "iter_official", breaks_half_way)


def test_failed_export_writes_nothing(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "half"
    break_export_half_way(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_run(str(run_dir["workdir"]), str(out))
    assert os.listdir(tmp_path) == []  # neither --out nor the temporary folder
    monkeypatch.undo()

    # A non-empty --out is never touched; a config SD3's layout cannot hold is refused up front.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_cli(run_dir["workdir"], out) == 2
    assert os.listdir(out) == ["keep.txt"]
    _, cfg, params, _ = restored(run_dir["workdir"])
    config = export.load_run_config(str(run_dir["workdir"]))
    with pytest.raises(export.ExportError, match="timestep_dim"):
        export.write_bundle(config, params, dataclasses.replace(cfg, timestep_dim=64), str(tmp_path / "d"),
                            "diffusers", {"source_step": 4, "ema": False})
    assert not (tmp_path / "d").exists()
    assert export_cli(tmp_path / "no_run", tmp_path / "x") == 2
    assert export_cli(run_dir["workdir"], tmp_path / "x", "--ema", "--step", "3") == 2
    assert not (tmp_path / "x").exists()
