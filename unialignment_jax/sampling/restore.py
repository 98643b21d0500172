"""Opening a trained run for `sample` and `evaluate`: W/config.json, the mesh, the frozen encoders
and the DiT parameters (latest or a given step, raw or EMA) restored onto this mesh's shardings.

Every problem a user can cause (no workdir, no config.json, a config that no longer validates, no
checkpoint, no EMA in it, a checkpoint step that cannot be read) is a `RunError` with a message that
names the path (and the step); the commands print it and exit with code 2. A damaged latest step is
not replaced by an older one: the message lists the other steps, for `--step`.

The workdir may be a URI (`gs://...`): config.json is read through etils epath
(unialignment_jax/paths.py) and the checkpoint directory is handed to Orbax as it is (Orbax reads
gs:// itself, with TensorStore's GCS driver).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import ml_collections

from unialignment_jax import config as config_lib
from unialignment_jax import paths


class RunError(Exception):
    """A run directory that cannot be used (exit code 2)."""


def _config_dict(d):
    """JSON -> ConfigDict, keeping key order at every level (the stages are trained in their order)."""
    if isinstance(d, dict):
        return ml_collections.ConfigDict({k: _config_dict(v) for k, v in d.items()}, sort_keys=False)
    if isinstance(d, list):  # JSON has no tuples; configs hold sequences as tuples
        return tuple(_config_dict(v) for v in d)
    return d


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """W/config.json (the resolved config the trainer wrote) as a validated, locked ConfigDict."""
    if not paths.is_dir(workdir):
        raise RunError(f"--workdir {workdir}: no such directory")
    path = paths.join(workdir, "config.json")
    if not paths.is_file(path):
        raise RunError(f"{path}: not found (is {workdir} a training run directory? `unialignment train` writes it)")
    try:
        with paths.open_file(path, "rb") as f:
            raw = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict) or "stages" not in raw or "model" not in raw:
        raise RunError(f"{path}: not a unialignment config (no 'model' / 'stages')")
    config = _config_dict(raw)
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise RunError(f"{path}: {e}") from None
    config.lock()
    return config


def make_mesh(config):
    """The run's mesh when it fits the devices here; otherwise all devices on `fsdp` (sampling
    does not need the training topology; restore targets whatever mesh this is)."""
    import jax

    from unialignment_jax.parallel import mesh as mesh_lib

    try:
        mesh_lib.mesh_shape(config.mesh, jax.device_count())
        return mesh_lib.make_mesh(config.mesh)
    except mesh_lib.MeshConfigError as e:
        fallback = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
        logging.info("the run's mesh does not fit %d devices (%s): using data=1, fsdp=-1, tensor=1",
                     jax.device_count(), e)
        return mesh_lib.make_mesh(fallback)


@dataclasses.dataclass
class Run:
    workdir: str
    config: Any
    mesh: Any
    rules: Any
    frozen: Any  # training/encoders.Frozen
    graphdef: Any  # the DiT's graphdef
    abstract_params: Any  # pure dict of ShapeDtypeStructs with this mesh's shardings
    params: Any  # pure dict of arrays (restored), or None before `restore`
    step: int | None = None
    ema: bool = False

    def sampler(self, **kwargs):
        from unialignment_jax.sampling.pipeline import Sampler

        return Sampler(self.config, self.mesh, self.rules, self.frozen, self.graphdef, **kwargs)


def dit_spec(config, mesh, rules):
    """(graphdef, abstract params as a pure dict of ShapeDtypeStructs with shardings)."""
    from flax import nnx

    from unialignment_jax.models import create
    from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT

    dit_cfg = DiTConfig.from_config(config.model)
    graphdef, abstract = create.abstract_state(lambda: UniAlignmentDiT(dit_cfg, rngs=nnx.Rngs(config.seed)),
                                               mesh, rules)
    return graphdef, nnx.to_pure_dict(abstract)


def open_run(workdir: str, *, ema: bool = False, step: int | None = None, restore: bool = True) -> Run:
    """Config, mesh, frozen encoders and (with `restore`) the parameters of `workdir`."""
    import jax

    from unialignment_jax.parallel import rules as rules_lib
    from unialignment_jax.training import checkpoint as checkpoint_lib
    from unialignment_jax.training import encoders as encoders_lib

    config = read_config(workdir)
    ckpt_dir = paths.join(workdir, "checkpoints")
    if restore and not paths.is_dir(ckpt_dir):
        raise RunError(f"{ckpt_dir}: no checkpoints (train first, or check --workdir)")
    mesh = make_mesh(config)
    rules = rules_lib.get_rules(config.sharding.rules)
    graphdef, abstract = dit_spec(config, mesh, rules)
    params, restored_step = None, None
    if restore:
        try:
            params, restored_step, _ = checkpoint_lib.restore_params(ckpt_dir, abstract, ema=ema, step=step)
        except (FileNotFoundError, ValueError) as e:  # ValueError: also checkpoint_lib.CheckpointError
            raise RunError(str(e)) from None
        except ImportError as e:  # Orbax asks google-cloud-storage about a gs:// bucket's layout
            if not paths.is_remote(ckpt_dir):
                raise
            raise RunError(f"{ckpt_dir}: reading a bucket checkpoint needs the bucket's client library "
                           f"(pip install google-cloud-storage gcsfs): {e}") from None
        jax.block_until_ready(params)
    try:
        frozen = encoders_lib.build_frozen(config, mesh, rules)
    except config_lib.ConfigError as e:
        raise RunError(f"{workdir}/config.json: {e}") from None
    return Run(workdir, config, mesh, rules, frozen, graphdef, abstract, params, restored_step, ema)


__all__ = ["RunError", "Run", "read_config", "open_run", "make_mesh", "dit_spec"]
