"""`unialignment export`: a run's weights as PyTorch safetensors that the official UniAlignment
code or diffusers load.

  unialignment export --workdir W --out DIR [--format official|diffusers] [--ema] [--step N]

What DIR holds (an SD3-style pipeline folder):

  transformer/config.json                     official: the constructor arguments of the official
                                              class (`SD3JointModelFlexible`); diffusers:
                                              `SD3Transformer2DModel`'s config
  transformer/diffusion_pytorch_model.safetensors
                                              official: exactly the official class's state dict
                                              (`load_state_dict(strict=True)`), float32;
                                              diffusers: SD3's layout where it maps (sd3_names.py)
  transformer/unialignment_extra.safetensors  diffusers only: the UniAlignment-only tensors under
                                              their official names (the last block's text path and
                                              its full 6*dim modulation, the text head,
                                              null_image_embd, the adapters)
  transformer/unialignment_config.json        diffusers only: the official config (vocab, heads...)
  scheduler/scheduler_config.json             FlowMatchEulerDiscreteScheduler; `shift` is the
                                              sampling shift: config `sampling.shift` when the run's
                                              config has one, else 3.0 (SD3-medium's; the official
                                              pipeline loads its checkpoint's scheduler, whose shift
                                              was not published). Training's shift
                                              (objective.timestep_shift) is recorded in export_info
  tokenizer/tokenizer_config.json (+ spiece.model)
                                              the run's tokenizer: T5Tokenizer (sentencepiece) or
                                              ByT5Tokenizer (byte) settings, pad = EOS as in training,
                                              max length = input.text_length; the word tokenizer
                                              (no HF class) writes its vocabulary there
  mask_token_emb.safetensors                  the `<extra_id_0>` embedding row the run's T5 used
                                              (key `mask_token_emb`, (d_model,) float32): from
                                              the text_encoder.mask_embedding file, else (unset or
                                              "none") row mask_token_id of
                                              text_encoder.weights; absent for a random T5. The
                                              trainer does not train this row yet, so it is the
                                              configured row, not a trained one
  export_info.json                            source step, EMA or not, format, files, notes

The source step and whether EMA weights were used are also in each safetensors header
(`unialignment_source_step`, `unialignment_ema`) and in transformer/config.json
(`_unialignment_export`).

Parameters are restored onto the run's mesh (or, when this host has other devices, an FSDP mesh
over what it has) and gathered one tensor (one layer of a stacked tensor) at a time straight into
the file, so the host never holds the model twice. Everything is written into a temporary folder
next to DIR and renamed onto DIR at the end: when export fails half-way DIR is not created. A
progress bar counts the bytes and tensors written (unialignment_jax/progress.py).

--workdir, --out and the config's file paths (text_encoder.weights / mask_embedding,
tokenizer.path) may be URIs (`gs://...`, through etils epath: unialignment_jax/paths.py; Orbax reads
a remote run's checkpoints itself). A bucket has no rename and its objects cannot be written at an
offset, which the safetensors writer needs: for a remote DIR the bundle is written into a local
temporary folder (under $TMPDIR: room for the whole export is needed there) and uploaded when it is
complete, export_info.json last, so a reader that waits for it never sees a partial bundle; a
failed upload removes what it had uploaded. Nothing is uploaded when export fails before that.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
from etils import epath

from unialignment_jax import paths
from unialignment_jax.interop import convert, sd3_names
from unialignment_jax.interop.export_files import (FORMATS, INFO_FILE, MASK_FILE, MASK_KEY, OFFICIAL_CLASS,
                                                   ExportError, config_value, mask_token_row,
                                                   official_class_deviations, official_config, safetensors_metadata,
                                                   scheduler_config, tokenizer_config, write_diffusers, write_official)
from unialignment_jax.interop.safetensors_write import save_file


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(out: str):
    """Yields a temporary folder next to `out`; renamed onto `out` (absent or empty) on success,
    removed on failure. For a remote `out`, a local temporary folder uploaded on success."""
    if paths.is_remote(out):
        with _staged_remote_dir(out) as tmp:
            yield tmp
        return
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)  # checked empty before the export started
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _staged_remote_dir(out: str):
    """`atomic_dir` for a URI: a bucket cannot rename a folder, so the bundle is staged locally
    and uploaded once complete (export_info.json last). Nothing is uploaded when the block fails;
    when the upload itself fails, what it had uploaded is removed (`out` was checked absent or
    empty before, and is checked again just before the upload)."""
    uploading = False
    try:
        with paths.staged_output(out, last=(INFO_FILE,)) as tmp:
            os.makedirs(tmp)
            yield tmp
            check_out(out)
            uploading = True
    except BaseException:
        if uploading:
            try:
                epath.Path(out).rmtree(missing_ok=True)
            except Exception as e:  # keep the upload's error; say what may be left behind
                logging.warning("export: could not remove the partial upload at %s (%s)", out, e)
        raise


def check_out(out: str) -> None:
    if paths.exists(out) and (not paths.is_dir(out) or paths.listdir(out)):
        raise ExportError(f"--out {out}: exists and is not an empty directory (export never overwrites)")


def write_bundle(config, params, cfg, out: str, fmt: str, info: dict) -> dict:
    """Everything export writes, into `out` atomically (only process 0 writes; every process must
    call this, for the gathers). `config` is the run's config (a dict or ConfigDict)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {FORMATS}")
    if fmt == "diffusers" and sd3_names.diffusers_incompatibilities(cfg):
        raise ExportError("cannot write diffusers' SD3 layout: " + "; ".join(sd3_names.diffusers_incompatibilities(cfg)))
    check_out(out)
    mask_row, mask_source = mask_token_row(config)
    info = dict(info, format=fmt, mask_token_embedding=mask_source if mask_row is not None else None,
                notes=list(info.get("notes", [])))
    if mask_row is None:
        info["notes"].append(mask_source)
    if config_value(config, "text_encoder.train_mask_embedding", False):
        info["notes"].append("text_encoder.train_mask_embedding is set, but checkpoints do not hold a trained "
                             "mask row yet: the exported row is the configured one")
    deviations = official_class_deviations(cfg)
    if deviations:
        info["notes"].append("loads into tests/torch_reference.UniAlignmentReference (it takes these sizes as "
                             "arguments) but not into the released official class, which hard-codes them: "
                             + "; ".join(deviations))
    if fmt == "diffusers" and cfg.timestep_fp16_round:
        info["notes"].append("diffusers' SD3 computes the timestep sinusoid in float32; this model rounds it to "
                             "float16 (model.timestep_fp16_round), so SD3Transformer2DModel's outputs differ from "
                             "the model's by that rounding")
    info["scheduler_shift"] = scheduler_config(config)["shift"]
    info["training_timestep_shift"] = config_value(config, "objective.timestep_shift", None)

    writer = jax.process_index() == 0
    ctx = atomic_dir(out) if writer else contextlib.nullcontext(None)
    with ctx as tmp:
        tdir = None
        if writer:
            tdir = os.path.join(tmp, "transformer")
            for sub in ("transformer", "scheduler", "tokenizer"):
                os.makedirs(os.path.join(tmp, sub))
        export_meta = {"source_step": info["source_step"], "ema": info["ema"], "format": fmt}
        if fmt == "official":
            files = write_official(params, cfg, tdir, info)
            transformer_config = dict(official_config(cfg), _unialignment_export=export_meta)
        else:
            files = write_diffusers(params, cfg, tdir, info)
            transformer_config = dict(sd3_names.diffusers_config(cfg), _unialignment_export=export_meta)
        if writer:
            _write_json(os.path.join(tdir, "config.json"), transformer_config)
            if fmt == "diffusers":
                _write_json(os.path.join(tdir, "unialignment_config.json"),
                            dict(official_config(cfg), _unialignment_export=export_meta))
                files.append("unialignment_config.json")
            files = [f"transformer/{f}" for f in files] + ["transformer/config.json"]
            _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), scheduler_config(config))
            _write_json(os.path.join(tmp, "tokenizer", "tokenizer_config.json"), tokenizer_config(config))
            files += ["scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"]
            spm = config_value(config, "tokenizer.path", "")
            if config_value(config, "tokenizer.kind") == "sentencepiece" and spm:
                if paths.is_file(spm):
                    if paths.is_remote(spm):
                        paths.copy_tree(spm, os.path.join(tmp, "tokenizer", "spiece.model"))
                    else:
                        shutil.copyfile(spm, os.path.join(tmp, "tokenizer", "spiece.model"))
                    files.append("tokenizer/spiece.model")
                else:
                    info["notes"].append(f"tokenizer.path {spm} not found: spiece.model not copied")
            if mask_row is not None:
                save_file(os.path.join(tmp, MASK_FILE), {MASK_KEY: np.asarray(mask_row, np.float32)},
                          safetensors_metadata(info, "mask_token_emb"))
                files.append(MASK_FILE)
            info["files"] = files + [INFO_FILE]
            _write_json(os.path.join(tmp, INFO_FILE), info)
    return info


# ------------------------------------------------------------------------------- from a run


def load_run_config(workdir: str):
    import ml_collections

    path = paths.join(workdir, "config.json")
    if not paths.is_file(path):
        raise ExportError(f"--workdir {workdir}: no config.json (not a run directory?)")
    try:
        with paths.open_file(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read ({e})") from None


def run_mesh(config):
    """The run's mesh when it fits this host's devices, else FSDP over all of them."""
    import ml_collections

    from unialignment_jax.parallel import mesh as mesh_lib
    from unialignment_jax.parallel import rules as rules_lib

    try:
        mesh = mesh_lib.make_mesh(config.mesh)
    except (ValueError, KeyError, AttributeError) as e:
        logging.info("export: the run's mesh does not fit here (%s); using fsdp over %d devices", e, jax.device_count())
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
    try:
        rules = rules_lib.get_rules(config.sharding.rules)
    except (KeyError, AttributeError, ValueError):
        rules = rules_lib.get_rules("fsdp")
    return mesh, rules


def export_run(workdir: str, out: str, fmt: str = "official", ema: bool = False, step: int | None = None) -> dict:
    """Export checkpoint `step` (default: the latest) of the run in `workdir` to `out`. A step that
    cannot be read is an ExportError naming it and the other steps (no fallback to an older one)."""
    from flax import nnx

    from unialignment_jax.models import create
    from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
    from unialignment_jax.training import checkpoint as checkpoint_lib

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {FORMATS}")
    check_out(out)
    config = load_run_config(workdir)
    cfg = DiTConfig.from_config(config.model)
    if fmt == "diffusers" and sd3_names.diffusers_incompatibilities(cfg):
        raise ExportError("cannot write diffusers' SD3 layout: " + "; ".join(sd3_names.diffusers_incompatibilities(cfg)))
    mesh, rules = run_mesh(config)
    _, abstract = create.abstract_state(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    try:
        params, step, meta = checkpoint_lib.restore_params(paths.join(paths.absolute(workdir), "checkpoints"),
                                                          nnx.to_pure_dict(abstract), ema=ema, step=step)
    except (FileNotFoundError, ValueError) as e:  # ValueError: also checkpoint_lib.CheckpointError
        raise ExportError(str(e)) from None
    info = {
        "source_workdir": paths.absolute(workdir), "source_step": int(step), "ema": bool(ema),
        "stage": meta.get("stage"), "exported_by": "unialignment_jax",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "official_class": OFFICIAL_CLASS, "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
    }
    return write_bundle(config, params, cfg, out, fmt, info)


def run(args, config) -> int:
    del config  # export reads the run's own W/config.json
    try:
        info = export_run(args.workdir, args.out, args.format, args.ema, args.step)
    except (ExportError, convert.CheckpointMismatch) as e:
        print(f"unialignment export: {e}", file=sys.stderr)
        return 2
    print(f"exported step {info['source_step']} of {info['source_workdir']} ({'EMA' if info['ema'] else 'raw'} "
          f"weights, {info['parameters']:,} parameters) as {info['format']} to {paths.absolute(args.out)}")
    for note in info["notes"]:
        print(f"  note: {note}")
    return 0


__all__ = ["ExportError", "INFO_FILE", "export_run", "write_bundle", "atomic_dir", "check_out"]
