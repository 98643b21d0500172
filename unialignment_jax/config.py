"""Experiment configs: loading (`--config path.py[:variant]` + `--config.a.b=v`), shared defaults,
validation, and stage helpers.

Every experiment file under `experiments/` starts from `base_config()` and changes values; it never
adds keys, so every config has the same schema and a mistyped override is an error. Configs are
locked after loading. `validate` checks values (and their consistency) before anything is written;
the CLI turns a `ConfigError` into a one-line message and exit code 2.

Validation imports the model package (and so jax): the CLI sets its XLA flags before loading.
"""

from __future__ import annotations

import json
from typing import Sequence

import ml_collections
from ml_collections import ConfigDict

from unialignment_jax import paths
from unialignment_jax.data.sources import DATA_DEFAULTS, absolute_source_list
from unialignment_jax.tasks import TASKS

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def base_config() -> ConfigDict:
    """The full schema with the 2B model's values (docs/method.md, "Architecture"); experiments override values."""
    c = ConfigDict()
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 1000

    c.model = ConfigDict(dict(
        num_layers=24,
        num_heads=24,
        head_dim=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        sample_size=128,
        pos_embed_max_size=192,
        context_dim=4096,
        vocab_size=32100,
        mlp_ratio=4,
        timestep_dim=256,
        timestep_fp16_round=True,
        num_null_tokens=8,
        block_depth=8,
        adapter_hidden=2048,
        adapter_out=3584,
        qk_norm=False,
        scan_layers=True,
        remat="none",
        attention="xla",
        dtype="float32",
        param_dtype="float32",
    ))

    # Shapes of one training example, used by `inspect`, `bench` and the trainer.
    c.input = ConfigDict(dict(
        resolution=512,  # pixels; latents are resolution / latent_downsample
        latent_downsample=8,
        text_length=256,
        num_compose_refs=3,
        # The caption task's fixed question: given before the caption in its text pass and in the
        # caption sampler, never masked nor scored (as VQA's question). Official: "" (captions are
        # sampled from an all-MASK sequence, and T2I / edit text passes always train without one).
        # The DiT's text stream has no positions of its own and T5's are relative, so an all-MASK
        # start gives every position the same prediction; a prompt is an anchor the caption's
        # positions are read from (experiments/demo.py measures both).
        caption_prompt="",
    ))

    # Frozen text encoder (T5 v1.1 encoder; models/t5.py). Random weights unless `weights` is set.
    c.text_encoder = ConfigDict(dict(
        preset="t5_xxl",  # t5_xxl | tiny (the demo's: d_model 64) | custom (then the sizes below are used)
        d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=32128,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        relative_attention_bias_std=0.0,  # random init only; 0 = HF's d_model**-0.5
        mask_token_id=32099,  # the tokenizer's <extra_id_0> (byte tokenizer: 259); -1 = no mask row
        weights="",  # HF T5EncoderModel safetensors: a file, or a directory with an index json
        # The aligned MASK row for <extra_id_0>: a .npy / .safetensors file (official: the Dual
        # Diffusion row, `unialignment convert-mask` converts its .pth), or "none": the tokenizer's
        # stock row on purpose. `train` refuses "" when `weights` loads pretrained T5 weights and
        # mask_token_id >= 0 (pretrained T5's stock row is not the row the official training uses;
        # models/encoders.check_mask_embedding); with random T5 weights (the demo) "" is the stock row.
        mask_embedding="",
        train_mask_embedding=False,  # must stay False: the trainer keeps the whole T5 frozen (see validate)
        use_attention_mask=False,  # official: no mask, EOS padding
        scan_layers=True,
        remat="none",  # models/layers.REMAT_POLICIES (matters only when the mask row is trained)
        dtype="bfloat16",
        param_dtype="bfloat16",  # the frozen weights' storage; the mask row is always float32
    ))
    c.tokenizer = ConfigDict(dict(
        kind="sentencepiece",  # sentencepiece (T5 spiece.model) | byte (needs no file) | words
        path="",  # sentencepiece: the spiece.model file
        vocabulary="",  # words: "shapes" (the Shapes world's tokens) or a file with one token per line
        pad_with="eos",  # eos (official: pad token = EOS) | pad (id 0)
    ))
    # Image codec: the SD3 VAE (models/vae.py) or the exact pixel codec (models/pixel_codec.py, which
    # uses input.latent_downsample and ignores the keys below).
    c.codec = ConfigDict(dict(
        kind="vae",  # vae | pixel
        weights="",  # diffusers AutoencoderKL directory (safetensors + config.json)
        scaling_factor=1.5305,
        shift_factor=0.0609,
        # VAE architecture for random weights (SD3's); with `weights`, its config.json decides.
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        dtype="float32",
    ))

    c.mesh = ConfigDict(dict(
        data=1, fsdp=-1, tensor=1,
        dcn_data=1, dcn_fsdp=1, dcn_tensor=1,
        dcn_granule="slice",  # 'slice' (TPU multi-slice) or 'process' (GPU hosts)
    ))
    c.sharding = ConfigDict(dict(rules="fsdp"))
    c.distributed = ConfigDict(dict(
        mode="auto",  # auto | on | off (see parallel/mesh.py: initialize_distributed)
        coordinator_address="",
        num_processes=1,
        process_id=0,
        local_device_ids="",
    ))

    c.optimizer = ConfigDict(dict(
        weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip=2.0,  # global L2 norm; 0 disables
        # How micro-batch gradients combine under accumulation: 'mean' (ours: the step's gradient is
        # the big-batch gradient) or 'sum' (official: loss.backward() per micro-batch without
        # division, so the clipped gradient is accum_steps x larger before clipping).
        grad_accum_reduce="mean",
    ))
    c.ema = ConfigDict(dict(
        decay=0.9999,  # 0 disables the EMA (the official code configures 0.9995 but never updates one)
        warmup=True,  # decay_t = min(decay, (1 + t) / (10 + t))
    ))
    c.objective = ConfigDict(dict(
        flow_loss="x0",  # x0 (official: sigma^2-weighted velocity MSE) | velocity
        timestep_shift=1.0,  # official training uses shift 1
        cfg_dropout=0.1,
        text_normalize="all",  # all (official: B*L positions) | tokens (non-padding only)
        contrastive_group_size=0,  # 0: negatives from the whole global (micro-)batch; 4: official
        antithetic_group_size=0,  # 0: antithetic t strata over the (micro-)batch
    ))
    c.batch_size = 384  # global batch; a stage's batch_size = 0 uses this
    c.stages = new_stages()  # ordered: the run trains the stages in this order
    c.stages.main = stage(steps=80_000, tasks="t2i,edit", warmup_steps=2000)

    # Where each task's examples come from: 'shapes' (the Shapes world, generated on the fly) or
    # prepared datasets "DIR[:WEIGHT],DIR[:WEIGHT]" (`unialignment prepare`); see data/sources.py.
    c.data = ConfigDict(dict(DATA_DEFAULTS))

    c.keep_checkpoints = 3  # the last N checkpoints are kept ...
    c.keep_checkpoint_every = 0  # ... plus every checkpoint at a multiple of this step (0: none)
    c.max_nonfinite_steps = 10  # consecutive skipped (non-finite) updates before the run stops
    c.sample_every = 0  # steps between sample grids (0: never)
    # What those grids show (sampling/hook.py): prompts "" = the hook's defaults for the run's data
    # (Shapes scenes and edits for a Shapes run), a .txt file (one prompt per line) or prompts
    # separated by '|'; the image sampler's steps and guidance scale (official: 50 and 7).
    c.sample = ConfigDict(dict(prompts="", steps=50, cfg=7.0))
    c.progress = "auto"  # progress line on a terminal: auto | on | off
    c.profile = ""  # "START:STOP": a jax.profiler trace of those steps under W/tb/ (training/profiler.py); "": none
    # Weights & Biases (training/wandb_run.py): off while project is ""; mode "" = wandb's choice, or online |
    # offline | disabled; entity / name "" = wandb's defaults.
    c.wandb = ConfigDict(dict(project="", entity="", name="", mode=""))
    # XLA's persistent compilation cache (restarts after preemption skip recompiling); '' disables.
    c.compilation_cache_dir = "~/.cache/unialignment_jax/xla"
    return c


def stage(steps: int, tasks: str = "t2i", **overrides) -> ConfigDict:
    """One stage's full schema; see training/schedule.py for how each field is used."""
    fields = dict(
        steps=steps,
        tasks=tasks,  # comma-separated task names
        task_weights="",  # '' = tasks take whole steps in turn; '3,1' = a seeded weighted mixture
        loss_weights=ConfigDict(dict(image=1.0, text=0.2, contrastive=0.05, align_image=0.1, align_text=0.1)),
        lr=3e-5,
        warmup_steps=0,
        lr_schedule="constant",  # constant | cosine (decays to final_lr_fraction * lr)
        final_lr_fraction=0.0,
        trainable=".*",  # regex over parameter paths ('blocks/img/qkv/kernel'); the rest is frozen
        batch_size=0,  # global batch of this stage; 0 = config.batch_size
        accum_steps=1,  # micro-batches per step (gradient accumulation)
        resolution=0,  # pixels; 0 = config.input.resolution
    )
    fields.update(overrides)
    return ConfigDict(fields)


def new_stages() -> ConfigDict:
    """An empty ordered stage table (ConfigDict sorts keys unless told not to)."""
    return ConfigDict(sort_keys=False)


def stage_names(config: ConfigDict) -> list[str]:
    return list(config.stages.keys())


# ------------------------------------------------------------------------------------- loading


def split_spec(spec: str) -> tuple[str, str | None]:
    """`path.py[:variant]` -> (path, variant or None); the path may be a URI (`gs://b/x.py:tiny`)."""
    scheme, sep, rest = spec.partition("://") if "://" in spec else ("", "", spec)
    file, colon, variant = rest.partition(":")
    return scheme + sep + file, (variant if colon else None)


def load(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load `path.py[:variant]` and apply `--config.a.b=v` overrides; returns the locked config.
    The file may be a URI (`gs://bucket/exp.py:variant`, through etils epath: paths.py).

    Raises ConfigError naming the file or key on any problem.
    """
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ConfigError(f"unknown argument {bad[0]!r} (config overrides look like --config.a.b=value)")
    path, variant = split_spec(spec)
    path = paths.absolute(path)  # `--config=~/exp.py` (no shell expansion after "=")
    if not paths.is_file(path):
        raise ConfigError(f"--config {spec}: cannot load ({path}: no such file)")
    # A remote file (gs://...) is imported from a temporary local copy (Python imports local files).
    with paths.local_copy(path) as local:
        local_spec = local if variant is None else f"{local}:{variant}"
        argv = ["unialignment", "--config", local_spec, *overrides]
        fv = flags.FlagValues()
        # sys_argv: config_flags pre-scans the argument list for override flags (default: sys.argv).
        config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv, lock_config=True,
                                        sys_argv=argv)
        named = lambda e: str(e).replace(local, path)  # messages name the file the user gave
        try:
            fv(argv)
            config = fv.config
        except flags.Error as e:
            raise ConfigError(named(e)) from None
        except (AttributeError, KeyError) as e:
            key = next((o.split("=")[0] for o in overrides if str(e).strip("'\"") in o), "an override")
            raise ConfigError(f"{key}: no such config key ({named(e)})") from None
        except (OSError, SyntaxError, ImportError, TypeError, ValueError) as e:
            raise ConfigError(f"--config {spec}: cannot load ({named(e).splitlines()[0]})") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"--config {spec}: get_config() must return an ml_collections.ConfigDict")
    validate(config)
    make_paths_absolute(config)
    config.lock()
    return config


# Config keys that name files or directories (besides config.data.<task> source lists).
PATH_KEYS = ("text_encoder.weights", "text_encoder.mask_embedding", "codec.weights", "tokenizer.path")
NO_MASK_EMBEDDING = "none"  # text_encoder.mask_embedding: the tokenizer's stock row, deliberately (not a path)


def mask_embedding_file(text_encoder) -> str:
    """The `text_encoder.mask_embedding` file to read, or "" ("" or "none": keep the stock row).
    `text_encoder` is the config section, or its dict from a run's config.json."""
    value = str(text_encoder["mask_embedding"] or "")
    return "" if value == NO_MASK_EMBEDDING else value


def make_paths_absolute(config: ConfigDict) -> None:
    """Make every file path in `config` absolute (`paths.absolute`: ~ expanded, URIs kept), in place,
    once, where the command starts: the run's config.json then records where the files are, and a
    command started later from another directory (resume, sample, export) still finds them."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        if key == "text_encoder.mask_embedding" and config[section][name] == NO_MASK_EMBEDDING:
            continue  # a choice, not a file
        config[section][name] = paths.absolute(config[section][name])
    config.compilation_cache_dir = paths.absolute(config.compilation_cache_dir)
    if config.sample.prompts.endswith(".txt"):  # a prompt file (else prompts separated by '|')
        config.sample.prompts = paths.absolute(config.sample.prompts)
    vocabulary = config.tokenizer.vocabulary
    if vocabulary and vocabulary != "shapes":  # "shapes": the Shapes world's built-in word list
        config.tokenizer.vocabulary = paths.absolute(vocabulary)
    for task in TASKS:
        if config.data.get(task):
            try:
                config.data[task] = absolute_source_list(str(config.data[task]))
            except ValueError as e:
                raise ConfigError(f"config.data.{task} = {config.data[task]!r}: {e}") from None


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2)


# ---------------------------------------------------------------------------------- validation


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


__all__ = ["ConfigError", "base_config", "load", "validate", "check_mesh_fits", "stage_names", "new_stages",
           "mask_embedding_file", "ml_collections"]
