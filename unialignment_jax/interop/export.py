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

from unialignment_jax import paths, progress
from unialignment_jax.config import mask_embedding_file
from unialignment_jax.interop import convert, sd3_names
from unialignment_jax.interop.safetensors_write import SafetensorsWriter, save_file

OFFICIAL_CLASS = "SD3JointModelFlexible"
OFFICIAL_DIFFUSERS_VERSION = "0.31.0"  # the diffusers release the official code pins
FORMATS = ("official", "diffusers")
MASK_FILE = "mask_token_emb.safetensors"
MASK_KEY = "mask_token_emb"
INFO_FILE = "export_info.json"
DEFAULT_SAMPLING_SHIFT = 3.0  # SD3-medium's scheduler


class ExportError(ValueError):
    """Bad arguments or a run that cannot be exported as asked; nothing was written."""


# ------------------------------------------------------------------------------------ configs


def official_config(cfg) -> dict:
    """The official class's constructor arguments (what `save_pretrained` would write), plus the
    sizes it hard-codes, which our PyTorch reference and `unialignment import` read (the official
    class takes **kwargs and ignores them)."""
    # SD3's constructor arguments (the official class subclasses it); its pooled projection is
    # removed, so pooled_projection_dim is unused there (SD3-medium's value).
    sd3 = sd3_names.diffusers_config(cfg, version=OFFICIAL_DIFFUSERS_VERSION)
    del sd3["dual_attention_layers"]
    return {
        **sd3,
        "_class_name": OFFICIAL_CLASS,
        "vocab_size": cfg.vocab_size,
        "timestep_dim": cfg.timestep_dim,
        "timestep_fp16_round": cfg.timestep_fp16_round,
        "num_null_tokens": cfg.num_null_tokens,
        "adapter_hidden": cfg.adapter_hidden,
        "adapter_out": cfg.adapter_out,
        "block_depth": cfg.block_depth,
    }


def official_class_deviations(cfg) -> list[str]:
    """Sizes the official class hard-codes that this model does not have: with any of them the
    export loads into our PyTorch reference (which takes them as arguments) but not into the
    official class as released."""
    out = []
    if cfg.timestep_dim != 256:
        out.append(f"timestep_dim {cfg.timestep_dim} (official: 256)")
    if cfg.num_null_tokens != 8:
        out.append(f"num_null_tokens {cfg.num_null_tokens} (official: 8)")
    if (cfg.width, cfg.adapter_hidden, cfg.adapter_out) != (1536, 2048, 3584):
        out.append(f"adapters {cfg.width}->{cfg.adapter_hidden}->{cfg.adapter_out} (official: 1536->2048->3584)")
    if cfg.mlp_ratio != 4:
        out.append(f"mlp_ratio {cfg.mlp_ratio} (official: 4)")
    if cfg.qk_norm:
        out.append("qk_norm (official: none)")
    if not cfg.timestep_fp16_round:
        out.append("timestep_fp16_round False (official: the sinusoid is cast to float16)")
    return out


def _get(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def scheduler_config(config) -> dict:
    shift = _get(config, "sampling.shift", None)
    if shift is None:
        shift = _get(config, "sampling.timestep_shift", DEFAULT_SAMPLING_SHIFT)
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": OFFICIAL_DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        "shift": float(shift),
        "use_dynamic_shifting": False,
    }


def tokenizer_config(config) -> dict:
    tok, te = config["tokenizer"], config["text_encoder"]
    byte, words = tok["kind"] == "byte", tok["kind"] == "words"
    pad = "</s>" if tok["pad_with"] == "eos" else "<pad>"
    out = {
        # The word tokenizer has no HF class with its layout: its vocabulary is written below.
        "tokenizer_class": None if words else ("ByT5Tokenizer" if byte else "T5Tokenizer"),
        "model_max_length": int(config["input"]["text_length"]),
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": pad,
        "extra_ids": 125 if byte else 100,  # words: 100 as T5
        "padding_side": "right", "truncation_side": "right",
        "unialignment": {
            "kind": tok["kind"], "pad_with": tok["pad_with"], "max_length": int(config["input"]["text_length"]),
            "padding": "max_length", "truncation": True, "append_eos": True,
            "mask_token": "<extra_id_0>", "mask_token_id": te["mask_token_id"],
            "vocab_size": config["model"]["vocab_size"], "use_attention_mask": te["use_attention_mask"],
        },
    }
    if words:
        from unialignment_jax.data.tokenizers import load_vocabulary

        out["unialignment"]["vocabulary"] = list(load_vocabulary(tok.get("vocabulary", "")))
        out["unialignment"]["word_ids_start"] = 3  # pad 0, eos 1, unk 2, words, then the sentinels
    return out


def mask_token_row(config) -> tuple[np.ndarray | None, str]:
    """(the run's `<extra_id_0>` embedding row or None, where it comes from / why there is none)."""
    from unialignment_jax.interop import encoder_import, t5_names
    from unialignment_jax.interop.safetensors_io import Checkpoint
    from unialignment_jax.models.t5 import T5Config

    te = config["text_encoder"]
    if te["mask_token_id"] is None or te["mask_token_id"] < 0:
        return None, "no mask row (text_encoder.mask_token_id = -1)"
    d_model = T5Config.from_config(te).d_model
    mask_file = mask_embedding_file(te)  # "none": the stock row, as below
    if mask_file:
        return encoder_import.read_mask_embedding(mask_file, d_model), f"text_encoder.mask_embedding ({mask_file})"
    if te["weights"]:
        ckpt = Checkpoint(te["weights"], encoder_import.T5_FILES)
        key = next((k for k in (t5_names.EMBED_KEY, *t5_names.TIED_ALIASES[t5_names.EMBED_KEY]) if k in ckpt), None)
        if key is None:
            raise ExportError(f"{ckpt.path}: no token embedding ({t5_names.EMBED_KEY}) to take the mask row from")
        row = np.array(ckpt.array(key)[te["mask_token_id"]], np.float32)
        return row, f"row {te['mask_token_id']} of {key} in {ckpt.path}"
    return None, "the run's T5 is randomly initialised (text_encoder.weights is empty): no mask row exported"


# -------------------------------------------------------------------------------- writing


class _NullWriter:
    def write(self, key, array):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _writer(directory: str | None, name: str, specs, metadata):
    if directory is None:  # not the writing process: still take part in the gathers
        return _NullWriter()
    return SafetensorsWriter(os.path.join(directory, name), specs, metadata)


def _nbytes(specs) -> dict[str, int]:
    return {key: int(np.prod(shape)) * np.dtype(dtype).itemsize for key, shape, dtype in specs}


class _Counted:
    """A writer that reports each tensor it writes (its size in the file) to the progress bar's `done`."""

    def __init__(self, writer, specs, done):
        self.writer, self.done, self.nbytes = writer, done, _nbytes(specs)

    def write(self, key, array):
        self.writer.write(key, array)
        self.done(self.nbytes[key])


def _st_metadata(info: dict, layout: str) -> dict[str, str]:
    return {"format": "pt", "unialignment_layout": layout, "unialignment_source_step": str(info["source_step"]),
            "unialignment_ema": str(bool(info["ema"])).lower(), "unialignment_exported_by": "unialignment_jax"}


def write_official(params, cfg, directory: str | None, info: dict) -> list[str]:
    """The official state dict into `directory`/diffusion_pytorch_model.safetensors, streamed."""
    specs = [(k, s, np.float32) for k, s in convert.expected_official_shapes(params, cfg).items()]
    with _writer(directory, sd3_names.DIFFUSERS_WEIGHTS, specs, _st_metadata(info, "official")) as w, \
            progress.tensor_bar(len(specs), sum(_nbytes(specs).values()), "export") as done:
        w = _Counted(w, specs, done)
        for key, tensor in convert.iter_official(params, cfg):
            w.write(key, tensor)
    return [sd3_names.DIFFUSERS_WEIGHTS]


def write_diffusers(params, cfg, directory: str | None, info: dict,
                    pooled_projection_dim: int = sd3_names.SD3_MEDIUM_POOLED_DIM) -> list[str]:
    """SD3's layout (diffusion_pytorch_model.safetensors) + the side file, streamed in one pass."""
    problems = sd3_names.diffusers_incompatibilities(cfg)
    if problems:
        raise ExportError("cannot write diffusers' SD3 layout: " + "; ".join(problems))
    dim, n = cfg.width, cfg.num_layers
    context_norm = set(sd3_names.context_norm_keys(n))
    main, extra = [], []
    for key, shape in convert.expected_official_shapes(params, cfg).items():
        if sd3_names.is_side_only(key, n):
            extra.append((key, shape, np.float32))
        elif key in context_norm:  # full AdaLN-Zero rows to the side file, SD3's [scale; shift] here
            extra.append((key, shape, np.float32))
            main.append((key, (2 * dim,) + tuple(shape[1:]), np.float32))
        else:
            main.append((sd3_names.to_diffusers_key(key), shape, np.float32))
    t = sd3_names.TEXT_EMBEDDER
    text_embedder = {t + "linear_1.weight": (dim, pooled_projection_dim), t + "linear_1.bias": (dim,),
                     t + "linear_2.weight": (dim, dim), t + "linear_2.bias": (dim,)}
    main += [(k, s, np.float32) for k, s in text_embedder.items()]
    with _writer(directory, sd3_names.DIFFUSERS_WEIGHTS, main, _st_metadata(info, "diffusers")) as wm, \
            _writer(directory, sd3_names.EXTRA_WEIGHTS, extra, _st_metadata(info, "unialignment_extra")) as we, \
            progress.tensor_bar(len(main) + len(extra), sum(_nbytes(main + extra).values()), "export") as done:
        wm, we = _Counted(wm, main, done), _Counted(we, extra, done)
        for key, tensor in convert.iter_official(params, cfg):
            if sd3_names.is_side_only(key, n):
                we.write(key, tensor)
            elif key in context_norm:
                we.write(key, tensor)
                wm.write(key, sd3_names.continuous_from_zero(tensor, dim))
            else:
                wm.write(sd3_names.to_diffusers_key(key), tensor)
        for key, shape in text_embedder.items():  # zeros: SD3's conditioning = the timestep embedding
            wm.write(key, np.zeros(shape, np.float32))
    return [sd3_names.DIFFUSERS_WEIGHTS, sd3_names.EXTRA_WEIGHTS]


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
    if _get(config, "text_encoder.train_mask_embedding", False):
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
    info["training_timestep_shift"] = _get(config, "objective.timestep_shift", None)

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
            spm = _get(config, "tokenizer.path", "")
            if _get(config, "tokenizer.kind") == "sentencepiece" and spm:
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
                          _st_metadata(info, "mask_token_emb"))
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


__all__ = ["ExportError", "export_run", "write_bundle", "write_official", "write_diffusers", "official_config",
           "scheduler_config", "tokenizer_config", "mask_token_row"]
