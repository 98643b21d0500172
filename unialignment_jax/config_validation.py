"""Config validation: `validate` checks every value of a config (and their consistency) and raises
`ConfigError` naming the first bad key; `check_mesh_fits` checks the mesh and batch sizes against
the devices at start. It also holds the few readers of config values that validation and
config.py share (`stage_names`, `mask_embedding_file`); config.py exports all of these.

Validation imports the model package (and so jax): the CLI sets its XLA flags before loading.
"""

from __future__ import annotations

from typing import Sequence

from ml_collections import ConfigDict

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def stage_names(config: ConfigDict) -> list[str]:
    return list(config.stages.keys())


NO_MASK_EMBEDDING = "none"  # text_encoder.mask_embedding: the tokenizer's stock row, deliberately (not a path)


def mask_embedding_file(text_encoder) -> str:
    """The `text_encoder.mask_embedding` file to read, or "" ("" or "none": keep the stock row).
    `text_encoder` is the config section, or its dict from a run's config.json."""
    value = str(text_encoder["mask_embedding"] or "")
    return "" if value == NO_MASK_EMBEDDING else value


def _check(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"config.{key} = {value!r}: {why}")


def _positive_ints(section: ConfigDict, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        v = section[name]
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{prefix}.{name}", v, "must be a positive integer")


def validate(config: ConfigDict) -> None:
    """Check values and their consistency; raises ConfigError naming the first bad key."""
    from unialignment_jax.models.attention import IMPLEMENTATIONS
    from unialignment_jax.models.mmdit import REMAT_POLICIES
    from unialignment_jax.parallel.rules import PRESETS

    m = config.model
    _positive_ints(m, "model", ("num_layers", "num_heads", "head_dim", "patch_size", "in_channels",
                                "out_channels", "sample_size", "pos_embed_max_size", "context_dim",
                                "vocab_size", "mlp_ratio", "timestep_dim", "num_null_tokens",
                                "block_depth", "adapter_hidden", "adapter_out"))
    _check((m.num_heads * m.head_dim) % 4 == 0, "model.head_dim", m.head_dim,
           "num_heads * head_dim must be divisible by 4 (2-D sin-cos position table)")
    _check(m.timestep_dim % 2 == 0, "model.timestep_dim", m.timestep_dim, "must be even")
    _check(m.block_depth <= m.num_layers, "model.block_depth", m.block_depth,
           f"the alignment tap must be a block in 1..num_layers ({m.num_layers})")
    _check(m.sample_size % m.patch_size == 0, "model.sample_size", m.sample_size, "must be divisible by patch_size")
    _check(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"choose one of {sorted(REMAT_POLICIES)}")
    _check(m.attention in IMPLEMENTATIONS, "model.attention", m.attention, f"choose one of {IMPLEMENTATIONS}")
    for key in ("dtype", "param_dtype"):
        _check(m[key] in DTYPES, f"model.{key}", m[key], f"choose one of {DTYPES}")

    inp = config.input
    _positive_ints(inp, "input", ("resolution", "latent_downsample", "text_length", "num_compose_refs"))
    _check(isinstance(inp.caption_prompt, str), "input.caption_prompt", inp.caption_prompt, "must be a string")
    latent = inp.resolution // inp.latent_downsample
    _check(inp.resolution % inp.latent_downsample == 0 and latent % m.patch_size == 0, "input.resolution",
           inp.resolution, f"must be a multiple of latent_downsample * patch_size = {inp.latent_downsample * m.patch_size}")
    _check(latent // m.patch_size <= m.pos_embed_max_size, "input.resolution", inp.resolution,
           f"gives a {latent // m.patch_size}-token grid side, more than model.pos_embed_max_size")

    for axis in ("data", "fsdp", "tensor"):
        v = config.mesh[axis]
        _check(isinstance(v, int) and (v == -1 or v > 0), f"mesh.{axis}", v, "must be a positive integer or -1 (fill)")
        d = config.mesh[f"dcn_{axis}"]
        _check(isinstance(d, int) and d > 0, f"mesh.dcn_{axis}", d, "must be a positive integer")
    _check([config.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) <= 1, "mesh", "-1",
           "at most one axis may be -1")
    _check(config.mesh.dcn_granule in ("slice", "process"), "mesh.dcn_granule", config.mesh.dcn_granule,
           "use 'slice' or 'process'")
    _check(config.sharding.rules in PRESETS, "sharding.rules", config.sharding.rules, f"choose one of {sorted(PRESETS)}")
    _check(m.num_heads % max(config.mesh.tensor, 1) == 0, "mesh.tensor", config.mesh.tensor,
           f"must divide model.num_heads ({m.num_heads})")
    _check(config.distributed.mode in ("auto", "on", "off"), "distributed.mode", config.distributed.mode,
           "choose auto, on or off")

    _validate_encoders(config)

    _validate_training(config)


def _validate_training(config: ConfigDict) -> None:
    from unialignment_jax.objectives import unified
    from unialignment_jax.training import profiler, schedule

    for key in ("log_every", "checkpoint_every", "batch_size", "keep_checkpoints", "max_nonfinite_steps"):
        v = config[key]
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, v, "must be a positive integer")
    for key in ("keep_checkpoint_every", "sample_every"):
        _check(isinstance(config[key], int) and config[key] >= 0, key, config[key], "must be >= 0 (0: off)")
    _check(config.progress in ("auto", "on", "off"), "progress", config.progress, "choose auto, on or off")
    if "sample" in config:  # absent in the config.json of older runs
        _check(isinstance(config.sample.prompts, str), "sample.prompts", config.sample.prompts,
               "must be a string: '' (defaults), a .txt file, or prompts separated by '|'")
        _positive_ints(config.sample, "sample", ("steps",))
        _check(config.sample.cfg >= 0, "sample.cfg", config.sample.cfg, "must be >= 0 (<= 1: no guidance)")
    try:
        profiler.parse(config.get("profile", ""))  # get: absent in the config.json of older runs
    except ValueError as e:
        raise ConfigError(f"config.profile = {config.profile!r}: {e}") from None
    wandb = config.get("wandb", ConfigDict(dict(project="", entity="", name="", mode="")))
    for key in ("project", "entity", "name"):
        _check(isinstance(wandb[key], str), f"wandb.{key}", wandb[key], "must be a string")
    _check(wandb.mode in ("", "online", "offline", "disabled"), "wandb.mode", wandb.mode,
           "choose '', online, offline or disabled")
    _check(len(config.stages) > 0, "stages", "{}", "needs at least one stage")
    for name in stage_names(config):
        st = config.stages[name]
        _positive_ints(st, f"stages.{name}", ("steps", "accum_steps"))
        for key in ("warmup_steps", "batch_size", "resolution"):
            _check(isinstance(st[key], int) and st[key] >= 0, f"stages.{name}.{key}", st[key], "must be >= 0")
        _check(st.lr >= 0, f"stages.{name}.lr", st.lr, "must be >= 0")
        if st.resolution:
            latent = st.resolution // config.input.latent_downsample
            _check(st.resolution % config.input.latent_downsample == 0 and latent % config.model.patch_size == 0,
                   f"stages.{name}.resolution", st.resolution, "must be a multiple of latent_downsample * patch_size")
    try:
        schedule.from_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    opt = config.optimizer
    _check(opt.grad_accum_reduce in ("mean", "sum"), "optimizer.grad_accum_reduce", opt.grad_accum_reduce,
           "choose mean (ours) or sum (official)")
    _check(opt.grad_clip >= 0, "optimizer.grad_clip", opt.grad_clip, "must be >= 0 (0: no clipping)")
    _check(0 <= config.ema.decay < 1, "ema.decay", config.ema.decay, "must be in [0, 1) (0: no EMA)")
    o = config.objective
    try:
        unified.ObjectiveOptions(flow_loss=o.flow_loss, timestep_shift=o.timestep_shift, cfg_dropout=o.cfg_dropout,
                                 text_normalize=o.text_normalize,
                                 contrastive_group_size=o.contrastive_group_size or None,
                                 antithetic_group_size=o.antithetic_group_size or None)
    except ValueError as e:
        raise ConfigError(f"objective.{e}") from None


def _validate_encoders(config: ConfigDict) -> None:
    """The text_encoder, tokenizer and codec sections on their own (cross-section consistency, e.g.
    T5 width vs model.context_dim, is checked when they are built: models/encoders.py)."""
    from unialignment_jax.data.tokenizers import KINDS as TOKENIZER_KINDS
    from unialignment_jax.models import t5

    te = config.text_encoder
    _check(te.preset in (*t5.PRESETS, "custom"), "text_encoder.preset", te.preset,
           f"choose one of {sorted(t5.PRESETS)} or 'custom'")
    _positive_ints(te, "text_encoder", t5.SIZE_FIELDS + ("relative_attention_num_buckets",
                                                         "relative_attention_max_distance"))
    if te.preset != "custom":
        for key in t5.SIZE_FIELDS:
            _check(te[key] in (t5.PRESETS[te.preset][key], t5.PRESETS["t5_xxl"][key]), f"text_encoder.{key}", te[key],
                   f"is not used with preset {te.preset!r} (which sets {t5.PRESETS[te.preset][key]}); "
                   "set text_encoder.preset = 'custom' to give the sizes yourself")
    resolved = t5.T5Config.from_config(te)
    _check(te.relative_attention_num_buckets % 4 == 0, "text_encoder.relative_attention_num_buckets",
           te.relative_attention_num_buckets, "must be a multiple of 4 (bidirectional exact + log buckets)")
    bias_std = te.get("relative_attention_bias_std", 0.0)  # absent in the config.json of older runs
    _check(bias_std >= 0, "text_encoder.relative_attention_bias_std", bias_std, "must be >= 0 (0 = HF's d_model**-0.5)")
    _check(te.layer_norm_epsilon > 0, "text_encoder.layer_norm_epsilon", te.layer_norm_epsilon, "must be positive")
    _check(isinstance(te.mask_token_id, int) and -1 <= te.mask_token_id < resolved.vocab_size,
           "text_encoder.mask_token_id", te.mask_token_id, f"must be -1 or an id below vocab_size {resolved.vocab_size}")
    # The T5 module can train its mask row alone (models/t5.trainable_filter), but the train state
    # holds only the DiT: refuse the flag rather than ignore it.
    _check(not te.train_mask_embedding, "text_encoder.train_mask_embedding", te.train_mask_embedding,
           "is not supported by the trainer: T5 stays frozen as in the official recipe, mask row "
           "included (set it with text_encoder.mask_embedding)")
    _check(not mask_embedding_file(te) or te.mask_token_id >= 0, "text_encoder.mask_embedding", te.mask_embedding,
           "needs a mask row (text_encoder.mask_token_id >= 0)")
    _check(te.remat in t5.REMAT_POLICIES, "text_encoder.remat", te.remat, f"choose one of {sorted(t5.REMAT_POLICIES)}")
    for key in ("dtype", "param_dtype"):
        _check(te[key] in DTYPES, f"text_encoder.{key}", te[key], f"choose one of {DTYPES}")

    tok = config.tokenizer
    _check(tok.kind in TOKENIZER_KINDS, "tokenizer.kind", tok.kind, f"choose one of {TOKENIZER_KINDS}")
    _check(tok.pad_with in ("eos", "pad"), "tokenizer.pad_with", tok.pad_with, "choose 'eos' or 'pad'")
    _check(tok.kind != "words" or bool(tok.get("vocabulary")), "tokenizer.vocabulary", tok.get("vocabulary"),
           "the word tokenizer needs 'shapes' or a vocabulary file")

    cd = config.codec
    _check(cd.kind in ("vae", "pixel"), "codec.kind", cd.kind, "choose 'vae' or 'pixel'")
    _check(cd.scaling_factor > 0, "codec.scaling_factor", cd.scaling_factor, "must be positive")
    _positive_ints(cd, "codec", ("layers_per_block", "latent_channels", "norm_num_groups"))
    boc = tuple(cd.block_out_channels)
    _check(len(boc) > 0 and all(isinstance(c, int) and c > 0 and c % cd.norm_num_groups == 0 for c in boc),
           "codec.block_out_channels", boc, f"must be positive multiples of codec.norm_num_groups ({cd.norm_num_groups})")
    _check(cd.dtype in DTYPES, "codec.dtype", cd.dtype, f"choose one of {DTYPES}")


def check_mesh_fits(config: ConfigDict, n_devices: int) -> dict[str, int]:
    """Resolve the mesh for `n_devices`, or raise ConfigError (used before anything is written)."""
    from unialignment_jax.parallel.mesh import MeshConfigError, mesh_shape

    try:
        ici, dcn = mesh_shape(config.mesh, n_devices)
    except MeshConfigError as e:
        raise ConfigError(f"config.{str(e)}") from None
    sizes = {a: ici[a] * dcn[a] for a in ici}
    batch_shards = sizes["data"] * sizes["fsdp"]
    _check(config.batch_size % batch_shards == 0, "batch_size", config.batch_size,
           f"must be divisible by the data-parallel size data * fsdp = {batch_shards}")
    for name in stage_names(config):
        st = config.stages[name]
        batch = st.batch_size or config.batch_size
        _check(batch % (batch_shards * st.accum_steps) == 0, f"stages.{name}.accum_steps", st.accum_steps,
               f"each micro-batch (batch {batch} / accum_steps) must split evenly over the "
               f"data-parallel size data * fsdp = {batch_shards}")
    return sizes
