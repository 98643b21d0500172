"""`unialignment import`: start a run (step 0, fresh optimizer) from PyTorch safetensors weights.

  unialignment import --source PATH --config C --workdir W [--allow-missing] [--allow-unexpected]

Sources (safetensors only; pickles are never read):
  * an official UniAlignment / Dual Diffusion transformer (`SD3JointModelFlexible` keys): a
    .safetensors file, an index json, or a folder (or pipeline folder with `transformer/`) holding
    diffusion_pytorch_model.safetensors[.index.json]. Everything maps (names.py).
  * an SD3(-medium) diffusers `SD3Transformer2DModel` folder: the shared backbone is copied, the
    image head comes from SD3's norm_out/proj_out, and what SD3 lacks is initialised as a fresh run
    would (seed = config.seed): the last block's text path (to_add_out, ff_context; its
    norm1_context takes SD3's shift/scale with zero gates and zero MLP shift/scale), the text
    head, null_image_embd and both adapters. SD3's pooled-text embedder is dropped. (sd3_names.py)
  * an `export --format diffusers` folder: SD3's layout plus unialignment_extra.safetensors;
    everything maps.
  * the frozen encoders are not imported here: set `text_encoder.weights` (HF T5EncoderModel
    safetensors), `text_encoder.mask_embedding` and `codec.weights` (diffusers AutoencoderKL
    folder) in the config; `train` loads them at start.

The whole source is checked against the model first: every missing, unexpected or mis-shaped
tensor is named in one error (CheckpointMismatch) unless `--allow-missing` (those are initialised
as a fresh run would) / `--allow-unexpected` (those are dropped) allow it; a config.json next to
the weights must agree with the config's model sizes; SD3's position table must equal ours (it
catches a different sample_size). Nothing is written before these checks pass. Then each tensor
streams from the memory-mapped file onto its target sharding (streaming.py; a progress bar counts
tensors and bytes), the train state is built on the mesh (training/state.init_state) and saved as
the run's step-0 checkpoint, with W/config.json and W/import_report.json.
`unialignment train --config C --workdir W` resumes from it.

--source and --workdir may be URIs (`gs://...`): the source is found and read through etils epath
(remote safetensors tensor by tensor, safetensors_io.py); Orbax writes the checkpoint to a remote
--workdir itself.

The mapping itself (source layouts, checks, tensor by tensor) is in interop/import_mapping.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import jax
from flax import nnx

from unialignment_jax import paths
from unialignment_jax.interop.convert import CheckpointMismatch
from unialignment_jax.interop.import_mapping import MASK_FILE, ImportReport, load_params, pure_params, resolve_source
from unialignment_jax.interop.safetensors_io import CheckpointFormatError

REPORT_FILE = "import_report.json"


class ImportFailed(ValueError):
    """A problem with the arguments or the target (nothing was written)."""



def import_run(source: str, config, workdir: str, *, allow_missing: bool = False,
               allow_unexpected: bool = False) -> ImportReport:
    """Initialise the run `workdir` (step 0, fresh optimizer and EMA) from `source`."""
    from etils import epath

    from unialignment_jax import config as config_lib
    from unialignment_jax.models import create
    from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
    from unialignment_jax.parallel import mesh as mesh_lib
    from unialignment_jax.parallel import rules as rules_lib
    from unialignment_jax.training import aot
    from unialignment_jax.training import checkpoint as checkpoint_lib
    from unialignment_jax.training import state as state_lib

    workdir = epath.Path(workdir)
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise ImportFailed(f"--workdir {workdir}: already holds checkpoints; import starts a new run "
                           "(use an empty --workdir)")
    config_lib.check_mesh_fits(config, jax.device_count())
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    cfg = DiTConfig.from_config(config.model)
    make = lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(config.seed))  # the trainer's fresh model
    spec = aot.train_state_spec(config, mesh, rules)  # the train state's shapes and shardings, as train's
    src = resolve_source(source)
    values, report = load_params(src, cfg, spec.abstract.params, make, mesh=mesh, rules=rules,
                                 allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    params = pure_params(spec.abstract.params, values)
    use_ema = config.ema.decay > 0
    build = lambda p: state_lib.init_state(p, spec.tx, config.seed, use_ema)
    with create.sharding_context(mesh, rules):
        state = jax.jit(build, out_shardings=spec.shardings)(params)
    jax.block_until_ready(state)

    if not config.text_encoder.weights:
        report.notes.append("text_encoder.weights is empty: the frozen T5 is random (set it to HF T5EncoderModel "
                            "safetensors); likewise codec.weights for the SD3 VAE")
    is_writer = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if src.mask_embedding and is_writer:
        target = workdir / MASK_FILE
        if paths.is_remote(src.mask_embedding) or paths.is_remote(target):
            paths.copy_tree(src.mask_embedding, target)
        else:
            shutil.copyfile(src.mask_embedding, os.fspath(target))
        if config.text_encoder.mask_embedding:
            report.notes.append(f"the source's mask-token row was copied to {target}; the config's "
                                f"text_encoder.mask_embedding ({config.text_encoder.mask_embedding}) is what train uses")
        else:
            report.notes.append(f"the source's mask-token row was copied to {target}: train with "
                                f"--config.text_encoder.mask_embedding={target} to use it")
    stage = config_lib.stage_names(config)[0]
    meta = {"step": 0, "stage": stage, "data": None, "config": json.loads(config_lib.to_json(config)),
            "imported_from": {"source": paths.absolute(source), "kind": report.kind}}
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints,
                                               config.keep_checkpoint_every)
    try:
        checkpointer.save(state, meta, force=True)
    finally:
        checkpointer.close()
    if is_writer:
        (workdir / "config.json").write_text(config_lib.to_json(config))
        (workdir / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    logging.info("import: %s -> %s (step 0)", source, workdir)
    return report


def run(args, config) -> int:
    from unialignment_jax import config as config_lib

    try:
        report = import_run(args.source, config, args.workdir, allow_missing=args.allow_missing,
                            allow_unexpected=args.allow_unexpected)
    except (CheckpointMismatch, CheckpointFormatError, FileNotFoundError, ImportFailed, config_lib.ConfigError) as e:
        print(f"unialignment import: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"run initialised at step 0 in {args.workdir}: unialignment train --config {args.config} "
          f"--workdir {args.workdir}")
    return 0
