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
import os
from typing import Sequence

import ml_collections
from ml_collections import ConfigDict

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def base_config() -> ConfigDict:
    """The full schema with the 2B model's values (METHOD.md §1); experiments override values."""
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
    ))

    # Frozen text encoder (T5 v1.1 encoder; models/t5.py). Random weights unless `weights` is set.
    c.text_encoder = ConfigDict(dict(
        preset="t5_xxl",  # t5_xxl | custom (then the sizes below are used)
        d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=32128,
        weights="",  # HF T5EncoderModel safetensors: a file, or a directory with an index json
        mask_embedding="",  # file holding the aligned <extra_id_0> embedding row (official: from DD)
        train_mask_embedding=False,
        use_attention_mask=False,  # official: no mask, EOS padding
        dtype="bfloat16",
    ))
    c.tokenizer = ConfigDict(dict(
        kind="sentencepiece",  # sentencepiece (T5 spiece.model) | byte (needs no file)
        path="",
    ))
    # Image codec: the SD3 VAE (models/vae.py) or the exact pixel codec (models/pixel_codec.py).
    c.codec = ConfigDict(dict(
        kind="vae",  # vae | pixel
        weights="",  # diffusers AutoencoderKL directory (safetensors + config.json)
        scaling_factor=1.5305,
        shift_factor=0.0609,
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
        lr=3e-5, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=2.0,
    ))
    c.batch_size = 384  # global batch
    c.stages = ConfigDict(sort_keys=False)  # ordered: the run trains the stages in this order
    c.stages.main = ConfigDict(dict(steps=80_000, tasks="t2i", warmup_steps=2000))
    return c


def new_stages() -> ConfigDict:
    """An empty ordered stage table (ConfigDict sorts keys unless told not to)."""
    return ConfigDict(sort_keys=False)


def stage_names(config: ConfigDict) -> list[str]:
    return list(config.stages.keys())


# ------------------------------------------------------------------------------------- loading


def load(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load `path.py[:variant]` and apply `--config.a.b=v` overrides; returns the locked config.

    Raises ConfigError naming the file or key on any problem.
    """
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ConfigError(f"unknown argument {bad[0]!r} (config overrides look like --config.a.b=value)")
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec}: cannot load ({path}: no such file)")
    argv = ["unialignment", "--config", spec, *overrides]
    fv = flags.FlagValues()
    # sys_argv: config_flags pre-scans the argument list for override flags (default: sys.argv).
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
        config = fv.config
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    except (AttributeError, KeyError) as e:
        key = next((o.split("=")[0] for o in overrides if str(e).strip("'\"") in o), "an override")
        raise ConfigError(f"{key}: no such config key ({e})") from None
    except (OSError, SyntaxError, ImportError, TypeError, ValueError) as e:
        raise ConfigError(f"--config {spec}: cannot load ({str(e).splitlines()[0]})") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"--config {spec}: get_config() must return an ml_collections.ConfigDict")
    validate(config)
    config.lock()
    return config


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

    _positive_ints(config, "", ("log_every", "checkpoint_every", "batch_size"))
    _check(len(config.stages) > 0, "stages", "{}", "needs at least one stage")
    for name in stage_names(config):
        _positive_ints(config.stages[name], f"stages.{name}", ("steps",))


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
    return sizes


__all__ = ["ConfigError", "base_config", "load", "validate", "check_mesh_fits", "stage_names", "new_stages",
           "ml_collections"]
