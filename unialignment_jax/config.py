"""Experiment configs: the schema (`base_config`, `stage`), loading (`--config path.py[:variant]` +
`--config.a.b=v`) and path handling; validation is in config_validation.py (exported from here).

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
# validation lives in config_validation.py; callers use these names from here (config.validate, ...)
from unialignment_jax.config_validation import (DTYPES, NO_MASK_EMBEDDING, ConfigError, check_mesh_fits,
                                                mask_embedding_file, stage_names, validate)
from unialignment_jax.data.sources import DATA_DEFAULTS, absolute_source_list
from unialignment_jax.tasks import TASKS


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


__all__ = ["ConfigError", "base_config", "load", "validate", "check_mesh_fits", "stage_names", "new_stages",
           "mask_embedding_file", "NO_MASK_EMBEDDING", "DTYPES", "ml_collections"]
