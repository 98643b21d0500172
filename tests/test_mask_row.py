"""The official MASK row: `convert-mask` reads a torch .pth (weights_only: tensors only) into the
safetensors file `text_encoder.mask_embedding` names, and `train` refuses pretrained T5 without a
chosen row (config level: nothing is built)."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from unialignment_jax import config as config_lib
from unialignment_jax import paths
from unialignment_jax.config import ConfigError
from unialignment_jax.interop import convert_mask, encoder_import
from unialignment_jax.interop.export_files import mask_token_row
from unialignment_jax.interop.safetensors_io import SafetensorsFile
from unialignment_jax.models import encoders
from unialignment_jax.models.t5 import T5Config

SPEC_2B = "experiments/unialignment_2b.py"


class NotATensor:
    """A custom class: its pickle names code, which torch.load(weights_only=True) refuses."""


def official_row(width=4096):
    return torch.randn(width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def test_official_bfloat16_row_converts_bit_for_bit(tmp_path):
    row = official_row()
    torch.save(row, tmp_path / "mask_token_emb.00-of-01.pth")
    out = str(tmp_path / "weights" / "mask_token_emb.safetensors")  # the folder is created
    convert_mask.convert(str(tmp_path / "mask_token_emb.00-of-01.pth"), out, d_model=4096)
    f = SafetensorsFile(out)
    assert f.keys() == ["mask_token_emb"] and str(f.array("mask_token_emb").dtype) == "bfloat16"  # kept
    got = encoder_import.read_mask_embedding(out, 4096)
    assert got.dtype == np.float32 and got.shape == (4096,)
    np.testing.assert_array_equal(got, row.float().numpy())  # bf16 -> f32 is exact
    with pytest.raises(convert_mask.ConvertError, match="already exists"):
        convert_mask.convert(str(tmp_path / "mask_token_emb.00-of-01.pth"), out)


@pytest.mark.parametrize("saved", [
    lambda t: {"emb": t.reshape(1, -1), "step": 3},  # one tensor among plain values, shape (1, d)
    lambda t: {"mask_token_emb": t, "other": t * 2},  # a known key
])
def test_a_dict_of_one_tensor_or_a_known_key(tmp_path, saved):
    row = official_row(8).float()
    torch.save(saved(row), tmp_path / "row.pth")
    convert_mask.convert(str(tmp_path / "row.pth"), str(tmp_path / "row.safetensors"))
    np.testing.assert_array_equal(encoder_import.read_mask_embedding(str(tmp_path / "row.safetensors"), 8),
                                  row.numpy())


@pytest.mark.parametrize("write, message", [
    (lambda p: torch.save({"row": torch.zeros(8), "obj": NotATensor()}, p), r"refused by torch.load\(weights_only"),
    (lambda p: pickle.dump(os.system, open(p, "wb"), protocol=2), r"refused by torch.load\(weights_only"),
    (lambda p: open(p, "wb").write(b"not a pickle"), "PyTorch file"),
    (lambda p: torch.save({"a": torch.zeros(8), "b": torch.ones(8)}, p), "a dict with 2 tensors"),
    (lambda p: torch.save(torch.zeros(2, 8), p), r"shape \(2, 8\)"),
    (lambda p: torch.save(torch.zeros(8, dtype=torch.int32), p), "dtype torch.int32"),
    (lambda p: torch.save(torch.zeros(6), p), "a row of 6 values, but text_encoder.d_model = 8"),
])
def test_bad_sources_are_refused_naming_the_file(tmp_path, write, message):
    src = str(tmp_path / "bad.pth")
    write(src)
    with pytest.raises(convert_mask.ConvertError, match=message) as e:
        convert_mask.convert(src, str(tmp_path / "out.safetensors"), d_model=8)
    assert src in str(e.value)
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_without_torch_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as without the [torch] extra
    with pytest.raises(convert_mask.ConvertError, match=r"unialignment_jax\[torch\]"):
        convert_mask.convert(str(tmp_path / "row.pth"), str(tmp_path / "row.safetensors"))


def test_the_command_checks_the_width_against_the_config(tmp_path, repo_root):
    demo = f"{repo_root}/experiments/demo.py:tiny"
    width = T5Config.from_config(config_lib.load(demo).text_encoder).d_model  # the demo's small T5
    torch.save(official_row(width), tmp_path / "row.pth")
    run = lambda *extra: subprocess.run(
        [sys.executable, "-m", "unialignment_jax", "convert-mask", "--source", str(tmp_path / "row.pth"),
         "--out", str(tmp_path / "row.safetensors"), *extra], capture_output=True, text=True, timeout=300)
    bad = run("--config", f"{repo_root}/{SPEC_2B}")  # T5-XXL: 4096 wide
    assert bad.returncode == 2 and "text_encoder.d_model = 4096" in bad.stderr
    ok = run("--config", demo)
    assert ok.returncode == 0, ok.stderr
    assert encoder_import.read_mask_embedding(str(tmp_path / "row.safetensors"), width).shape == (width,)
    with pytest.raises(ValueError, match="convert-mask"):  # the reader names the command for a .pth
        encoder_import.read_mask_embedding(str(tmp_path / "row.pth"), width)


def test_pretrained_t5_needs_a_chosen_mask_row(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = f"{repo_root}/{SPEC_2B}"
    shipped = config_lib.load(spec)
    assert shipped.text_encoder.mask_embedding == str(tmp_path / "weights" / "mask_token_emb.safetensors")
    with pytest.raises(ConfigError, match="text_encoder.mask_embedding = .*no such file"):
        encoders.check_mask_embedding(shipped)  # the named file must be there
    with pytest.raises(ConfigError, match="config.text_encoder.mask_embedding = ''.*convert-mask"):
        encoders.check_mask_embedding(config_lib.load(spec, ["--config.text_encoder.mask_embedding="]))
    stock = config_lib.load(spec, ["--config.text_encoder.mask_embedding=none"])
    assert stock.text_encoder.mask_embedding == "none"  # a choice, not made into a path
    encoders.check_mask_embedding(stock)
    assert encoders.read_mask_row(stock) is None
    torch.save(official_row(), tmp_path / "row.pth")
    convert_mask.convert(str(tmp_path / "row.pth"), str(tmp_path / "weights" / "mask_token_emb.safetensors"))
    encoders.check_mask_embedding(shipped)
    # random T5 weights (the demo) have no pretrained row to replace: "" is the stock row
    encoders.check_mask_embedding(config_lib.load(f"{repo_root}/experiments/demo.py"))


def test_export_reads_none_as_the_stock_row():
    te = dict(config_lib.base_config().text_encoder.to_dict(), mask_embedding="none")  # and no T5 weights
    row, why = mask_token_row({"text_encoder": te})
    assert row is None and "randomly initialised" in why


def test_source_and_out_in_a_bucket(tmp_path, bucket):
    row = official_row(16)
    torch.save(row, tmp_path / "row.pth")
    paths.copy_tree(str(tmp_path / "row.pth"), f"{bucket}/ckpt/row.pth")
    convert_mask.convert(f"{bucket}/ckpt/row.pth", f"{bucket}/weights/row.safetensors", d_model=16)
    np.testing.assert_array_equal(encoder_import.read_mask_embedding(f"{bucket}/weights/row.safetensors", 16),
                                  row.float().numpy())
