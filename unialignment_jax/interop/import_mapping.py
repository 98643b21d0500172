"""The weight mapping of `unialignment import` (interop/import_weights.py is the command): find a
source's safetensors and tell its layout (official, SD3 diffusers, our diffusers export), check it
against the config, and map every tensor onto the model's parameter tree (a fresh initialisation
for what the source lacks), streamed onto the target shardings (streaming.py)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx

from unialignment_jax import paths
from unialignment_jax.interop import names, sd3_names, streaming
from unialignment_jax.interop.convert import CheckpointMismatch, fetch, flatten
from unialignment_jax.interop.export_files import MASK_FILE  # an export folder's mask row
from unialignment_jax.interop.safetensors_io import FLOAT_CODES, Checkpoint, CheckpointFormatError, read_json
from unialignment_jax.models import embeddings

WEIGHT_FILES = (sd3_names.DIFFUSERS_WEIGHTS, "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------- the source


@dataclasses.dataclass
class Source:
    kind: str  # official | sd3 | diffusers_export
    weights: Checkpoint
    extra: Checkpoint | None = None
    config: dict | None = None
    config_path: str | None = None
    mask_embedding: str | None = None  # a bundle's mask_token_emb.safetensors


def _no_pickles(folder: str) -> None:
    pickles = [n for n in sorted(paths.listdir(folder)) if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointFormatError(f"{folder}: holds only pickle checkpoints ({', '.join(pickles)}), which are never "
                                    "read; convert them once with safetensors.torch.save_file(state_dict, path)")


def resolve_source(path: str) -> Source:
    """Find the weights (and side file, config.json, mask row) at `path` and tell their layout."""
    if not paths.exists(path):
        raise FileNotFoundError(f"--source {path}: no such file or directory")
    if paths.is_file(path):
        if path.endswith(PICKLE_SUFFIXES):
            raise CheckpointFormatError(f"{path}: a pickle checkpoint, which is never read; convert it once with "
                                        "safetensors.torch.save_file(state_dict, path)")
        weights, folder = Checkpoint(path), paths.parent(paths.absolute(path))
    else:
        folder = path
        has = lambda d: any(paths.is_file(paths.join(d, n + s)) for n in WEIGHT_FILES for s in ("", ".index.json"))
        if not has(folder) and paths.is_dir(paths.join(path, "transformer")):
            folder = paths.join(path, "transformer")  # a pipeline folder
        if not has(folder):
            _no_pickles(folder)
        weights = Checkpoint(folder, WEIGHT_FILES)
    src = Source(kind="official", weights=weights)
    extra = paths.join(folder, sd3_names.EXTRA_WEIGHTS)
    if paths.is_file(extra):
        src.extra = Checkpoint(extra)
    for name in ("unialignment_config.json", "config.json"):
        candidate = paths.join(folder, name)
        if paths.is_file(candidate):
            src.config, src.config_path = read_json(candidate), candidate
            break
    for d in (folder, paths.parent(paths.absolute(folder))):
        if paths.is_file(paths.join(d, MASK_FILE)):
            src.mask_embedding = paths.join(d, MASK_FILE)
            break
    keys = set(weights.keys())
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise CheckpointFormatError(
            f"{weights.path}: an original (single-file) SD3 checkpoint; import reads diffusers' layout: convert it "
            "once with SD3Transformer2DModel.from_single_file(path).save_pretrained(folder)")
    if src.extra is not None:
        src.kind = "diffusers_export"
    elif keys & {"image_proj_out.weight", "image_norm_out.linear.weight", "text_proj_out.weight"}:
        src.kind = "official"
    elif keys & {"proj_out.weight", "norm_out.linear.weight"} or any(k.startswith(sd3_names.TEXT_EMBEDDER) for k in keys):
        src.kind = "sd3"
    elif (src.config or {}).get("_class_name") == "SD3Transformer2DModel":
        src.kind = "sd3"
    return src


# ------------------------------------------------------------------------------------- report


@dataclasses.dataclass
class ImportReport:
    source: str
    kind: str
    copied: list[str] = dataclasses.field(default_factory=list)  # official keys read as stored
    renamed: list[str] = dataclasses.field(default_factory=list)  # 'source key -> official key'
    transformed: list[str] = dataclasses.field(default_factory=list)
    reinitialised: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"import from {self.source} ({self.kind} layout)",
                 f"  copied          {len(self.copied) + len(self.renamed)} tensors"
                 + (f" ({len(self.renamed)} renamed: {', '.join(self.renamed)})" if self.renamed else "")]
        for title, items in (("transformed", self.transformed), ("re-initialised", self.reinitialised),
                             ("dropped", self.dropped)):
            lines.append(f"  {title:<15} {len(items)} tensors" + (":" if items else ""))
            lines += [f"    {k}" for k in items]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------- the mapped view


@dataclasses.dataclass
class _Entry:
    shape: tuple[int, ...]
    code: str
    load: Callable[[], np.ndarray]
    origin: str  # for messages: 'key (in file)'
    source_shape: tuple[int, ...] | None = None


class MappedCheckpoint:
    """The source as the official state dict (the interface streaming.py reads): renamed,
    transformed and freshly initialised tensors behind the official keys, loaded on demand."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, _Entry] = {}

    def add(self, key: str, entry: _Entry) -> None:
        self.entries[key] = entry

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype_code(self, key: str) -> str:
        return self.entries[key].code

    def file_of(self, key: str) -> str:
        return self.entries[key].origin

    def array(self, key: str) -> np.ndarray:
        return self.entries[key].load()


def _stored(ckpt: Checkpoint, key: str, main: str | None = None) -> _Entry:
    """A stored tensor; messages name its file when it is not `main` (the file the error names)."""
    where = ckpt.file_of(key)
    origin = key if where == main else f"{key} (in {where})"
    return _Entry(tuple(ckpt.shape(key)), ckpt.dtype_code(key), lambda: ckpt.array(key), origin)


# --------------------------------------------------------------------------- config checks


def check_source_config(src: Source, cfg) -> None:
    """A config.json next to the weights must describe the same model as the run's config."""
    if not src.config:
        return
    c = src.config
    want = {"num_layers": cfg.num_layers, "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
            "joint_attention_dim": cfg.context_dim, "patch_size": cfg.patch_size, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "sample_size": cfg.sample_size,
            "pos_embed_max_size": cfg.pos_embed_max_size, "caption_projection_dim": cfg.width}
    ours = {"num_layers": "num_layers", "attention_head_dim": "head_dim", "num_attention_heads": "num_heads",
            "joint_attention_dim": "context_dim", "caption_projection_dim": "num_heads * head_dim"}
    if src.kind != "sd3":
        want.update(vocab_size=cfg.vocab_size, timestep_dim=cfg.timestep_dim, num_null_tokens=cfg.num_null_tokens,
                    adapter_hidden=cfg.adapter_hidden, adapter_out=cfg.adapter_out)
    bad = [f"{k} = {c[k]!r} (config: model.{ours.get(k, k)} = {v!r})" for k, v in want.items()
           if k in c and c[k] is not None and c[k] != v]
    if "qk_norm" in c and bool(c["qk_norm"]) != bool(cfg.qk_norm):
        bad.append(f"qk_norm = {c['qk_norm']!r} (config: model.qk_norm = {cfg.qk_norm})")
    if c.get("dual_attention_layers"):
        bad.append(f"dual_attention_layers = {c['dual_attention_layers']} (SD3.5's dual attention is not "
                   "part of this model)")
    if bad:
        raise CheckpointMismatch(f"{src.config_path} does not describe the configured model: " + "; ".join(bad))


def _pos_embed_problem(ckpt: Checkpoint, cfg) -> str | None:
    """SD3's fixed position table, if stored, must be ours (same width, max size and sample_size)."""
    key = names.POS_EMBED_KEY
    expected = (1, cfg.pos_embed_max_size ** 2, cfg.width)
    if tuple(ckpt.shape(key)) != expected:
        return (f"{key}: {list(ckpt.shape(key))} in {ckpt.file_of(key)}, the model expects {list(expected)} "
                "(model.pos_embed_max_size or width differ)")
    table = embeddings.sincos_table(cfg.width, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
    step = max(1, table.shape[0] // 256)
    theirs = np.asarray(ckpt.array(key)[0, ::step], np.float32)
    if not np.allclose(theirs, table[::step], atol=1e-2):
        return (f"{key} in {ckpt.file_of(key)} is not the model's position table (model.sample_size = "
                f"{cfg.sample_size} and pos_embed_max_size = {cfg.pos_embed_max_size} give another one)")
    return None


# -------------------------------------------------------------------------------- mapping


def _map_official(src: Source, expected, view: MappedCheckpoint, report: ImportReport, unexpected: list[str]) -> None:
    ckpt = src.weights
    for key in ckpt.keys():  # (an index json's shards are named per tensor)
        if key in expected:
            view.add(key, _stored(ckpt, key, ckpt.path))
            report.copied.append(key)
        elif key != names.POS_EMBED_KEY:
            unexpected.append(f"{key} (in {ckpt.file_of(key)})")


def _map_sd3(src: Source, cfg, expected, view: MappedCheckpoint, report: ImportReport, unexpected: list[str]) -> None:
    ckpt, extra, dim, n = src.weights, src.extra, cfg.width, cfg.num_layers
    context_norm = set(sd3_names.context_norm_keys(n))
    for skey in ckpt.keys():
        if skey == names.POS_EMBED_KEY:
            continue
        if skey.startswith(sd3_names.TEXT_EMBEDDER):
            report.dropped.append(skey)  # the pooled-text projection: removed in UniAlignment
            continue
        okey = sd3_names.from_diffusers_key(skey)
        shape = tuple(ckpt.shape(skey))
        if okey in context_norm and shape[:1] == (2 * dim,):
            rest = None
            if extra is not None and okey in extra:
                if tuple(extra.shape(okey)) != (6 * dim,) + shape[1:]:
                    view.add(okey, _stored(extra, okey, ckpt.path))  # mis-shaped: reported with the others
                    continue
                rest = lambda okey=okey: np.asarray(extra.array(okey))[2 * dim:]
            load = (lambda skey=skey, rest=rest: sd3_names.zero_from_continuous(
                np.asarray(ckpt.array(skey)), dim, None if rest is None else rest()))
            view.add(okey, _Entry((6 * dim,) + shape[1:], ckpt.dtype_code(skey), load, skey, source_shape=shape))
            if rest is None:
                report.transformed.append(f"{okey} (SD3's [scale; shift] -> AdaLN-Zero [shift; scale]; gate, "
                                          "MLP shift/scale, MLP gate zero)")
            else:
                report.transformed.append(f"{okey} (shift/scale from SD3's [scale; shift], gate and MLP rows "
                                          f"from {sd3_names.EXTRA_WEIGHTS})")
        elif okey in expected:
            view.add(okey, _stored(ckpt, skey, ckpt.path))
            if okey != skey:
                report.renamed.append(f"{skey} -> {okey}")
            else:
                report.copied.append(okey)
        else:
            unexpected.append(f"{skey} (in {ckpt.file_of(skey)})")
    if extra is None:
        return
    for key in extra.keys():
        if key in context_norm and key in view:
            continue  # merged above
        if key in view:
            unexpected.append(f"{key} (in both {extra.path} and {ckpt.path})")
        elif key in expected:
            view.add(key, _stored(extra, key, ckpt.path))
            report.copied.append(key)
        else:
            unexpected.append(f"{key} (in {extra.file_of(key)})")


def _fresh_values(make: Callable[[], nnx.Module], flat_abstract: dict, paths: list[str], mesh=None, rules=None):
    """Only the parameters `paths` of a fresh `make()` (one jitted init; the rest is dead code)."""
    from unialignment_jax.models import create

    shardings = {p: flat_abstract[p].sharding for p in paths}

    def init():
        with nnx.use_eager_sharding(False):
            flat = streaming.flat_leaves(nnx.state(make()))
        return {p: flat[p] for p in paths}

    if mesh is not None:
        with create.sharding_context(mesh, rules):
            return jax.jit(init, out_shardings=shardings)()
    return jax.jit(init, out_shardings=shardings)()


def load_params(source, cfg, abstract_state, make: Callable[[], nnx.Module], *, mesh=None, rules=None,
                allow_missing: bool = False, allow_unexpected: bool = False) -> tuple[dict, ImportReport]:
    """{our '/'-path: jax.Array on its target sharding} for every parameter, and the report.

    `abstract_state` is the abstract State of `make()`, or its pure dict (ShapeDtypeStructs carrying
    the target shardings);
    `make` builds the model for the tensors the source lacks (initialised as a fresh run would).
    """
    src = source if isinstance(source, Source) else resolve_source(source)
    flat = flatten(abstract_state)
    rows = names.official_rows(cfg.qk_norm)
    n = cfg.num_layers
    expected = streaming.expected_shapes(rows, flat, n)
    check_source_config(src, cfg)
    report = ImportReport(source=src.weights.path, kind=src.kind)
    view = MappedCheckpoint(src.weights.path)
    unexpected: list[str] = []
    if src.kind == "official":
        _map_official(src, expected, view, report, unexpected)
    else:
        _map_sd3(src, cfg, expected, view, report, unexpected)

    problems = []
    if names.POS_EMBED_KEY in src.weights:
        p = _pos_embed_problem(src.weights, cfg)
        if p:
            problems.append(p)
    missing = [k for k in expected if k not in view]
    documented = [k for k in missing if src.kind == "sd3" and sd3_names.is_side_only(k, n)]
    missing = [k for k in missing if k not in documented]
    misshaped, bad_dtype = [], []
    for key, e in view.entries.items():
        if e.source_shape is not None and e.shape != expected[key]:
            misshaped.append(f"{e.origin}: {list(e.source_shape)}, the model expects {list(expected[key])} "
                             f"as {key} (or [{2 * cfg.width}, ...] in SD3's layout)")
        elif e.shape != expected[key]:
            misshaped.append(f"{e.origin}: {list(e.shape)}, the model expects {list(expected[key])}")
        elif e.code not in FLOAT_CODES:
            bad_dtype.append(f"{e.origin}: {e.code}")
    problems += streaming.mismatch_problems([] if allow_missing else missing,
                                            [] if allow_unexpected else unexpected, misshaped, bad_dtype)
    if problems:
        raise CheckpointMismatch(f"{src.weights.path} ({src.kind} layout) does not match the model: "
                                 + " | ".join(problems))
    report.dropped += unexpected
    fresh_keys = documented + missing
    report.reinitialised = list(fresh_keys)

    if fresh_keys:  # initialised as a fresh run would be, per torch tensor (one layer for block rows)
        where = {}
        for row in rows:
            for i in (range(n) if row.per_layer else [None]):
                for j, key in enumerate(row.torch):
                    where[key.format(i=i)] = (row, i, j)
        paths = sorted({where[k][0].ours for k in fresh_keys})
        fresh = _fresh_values(make, flat, paths, mesh, rules)
        for key in fresh_keys:
            row, i, j = where[key]
            load = lambda row=row, i=i, j=j: names.to_torch(row, fetch(fresh[row.ours], i))[j]
            view.add(key, _Entry(expected[key], "F32", load, f"{key} (fresh initialisation)"))
    key_map = streaming.check(view, rows, flat, n)
    values = streaming.stream(view, rows, flat, n, key_map)
    if src.kind == "sd3":
        report.notes.append("SD3's pooled-text embedder is dropped: conditioning is the timestep embedding alone")
    return values, report


def pure_params(abstract_params: dict, values: dict) -> dict:
    """`abstract_params` (the trainer's TrainState.params structure) with leaves from `values`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    keys = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
    left = [k for k in keys if k not in values]
    if left:
        raise CheckpointMismatch(f"no value loaded for parameters: {streaming.limit_names(left)}")
    return jax.tree_util.tree_unflatten(treedef, [values[k] for k in keys])
