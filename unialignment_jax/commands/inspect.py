"""`unialignment inspect`: parameter counts, FLOPs per step, and (with --compile) per-device memory
from an AOT compile on the configured mesh. Nothing is allocated: shapes are abstract.

Memory comes from XLA's `memory_analysis()` of the compiled computation for one device: arguments
(parameters, optimizer state, batch shards), outputs, temporaries (activations kept for the
backward pass, gathered FSDP weights, collective buffers), and generated code.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from flax import nnx

from unialignment_jax import tasks as tasks_lib
from unialignment_jax.interop.convert import flatten
from unialignment_jax.models import create, flops
from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
from unialignment_jax.parallel import mesh as mesh_lib
from unialignment_jax.parallel import rules as rules_lib

MODULE_GROUPS = {  # reported module -> parameter path prefixes
    "patch_embed": ("patch_embed",),
    "time_embed": ("time_embed_1", "time_embed_2"),
    "context_embedder": ("context_embedder",),
    "blocks": ("blocks",),
    "image_head": ("image_norm_out", "image_proj_out"),
    "text_head": ("text_proj_out",),
    "null_image_embd": ("null_image_embd",),
    "adapters": ("adapter_img", "adapter_txt"),
}


def params_by_module(abstract) -> dict[str, int]:
    flat = flatten(abstract)
    out = {}
    for name, prefixes in MODULE_GROUPS.items():
        out[name] = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.split("/")[0] in prefixes)
    missing = [k for k in flat if not any(k.split("/")[0] in p for p in MODULE_GROUPS.values())]
    if missing:
        raise RuntimeError(f"inspect: parameters outside every reported module: {missing}")
    return out


def compile_train_step(config, task: str, batch: int, accum: int, mesh, rules, latents: bool):
    """AOT-compile the real train step of the first stage (both passes, the frozen text encoder,
    the codec's encoder unless `latents`, the optimizer) from abstract inputs."""
    from unialignment_jax.training import aot

    return aot.lower_train_step(config, task, mesh, rules, batch_size=batch, accum_steps=accum,
                                latents=latents).compile()


def memory_report(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    fields = dict(arguments="argument_size_in_bytes", outputs="output_size_in_bytes",
                  temporaries="temp_size_in_bytes", generated_code="generated_code_size_in_bytes",
                  aliased="alias_size_in_bytes")
    report = {k: int(getattr(m, v, 0) or 0) for k, v in fields.items()}
    report["total"] = report["arguments"] + report["outputs"] + report["temporaries"] - report["aliased"]
    return report


def parse_mesh(text: str) -> dict[str, int]:
    """`--mesh DATA,FSDP,TENSOR` (one may be -1) -> {'data': .., 'fsdp': .., 'tensor': ..}."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) != len(mesh_lib.MESH_AXES) or any(v == 0 or v < -1 for v in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"--mesh {text!r}: give DATA,FSDP,TENSOR as positive integers, at most one -1 "
                         "(e.g. 1,-1,1 or 2,32,1)")
    return dict(zip(mesh_lib.MESH_AXES, sizes))


def run(args, config) -> int:
    import jax

    from unialignment_jax.models.layers import CPU_SCAN_ENV

    # inspect compiles and never executes, so simulated CPU devices keep the layer scans
    # (models/layers.use_layer_scan): the plan is the one an accelerator would compile.
    os.environ[CPU_SCAN_ENV] = "1"
    if getattr(args, "mesh", ""):
        try:
            config.mesh.update(parse_mesh(args.mesh))
        except ValueError as e:
            print(f"unialignment inspect: {e}", file=sys.stderr)
            return 2
    try:
        ici, dcn = mesh_lib.mesh_shape(config.mesh, jax.device_count())
    except mesh_lib.MeshConfigError as e:
        print(f"unialignment inspect: config.{e} (devices: {jax.device_count()}; simulate more with "
              "--cpu_devices N)", file=sys.stderr)
        return 2
    shards = ici["data"] * dcn["data"] * ici["fsdp"] * dcn["fsdp"]
    if args.compile and (args.batch or config.batch_size) % shards:
        print(f"unialignment inspect: global batch {args.batch or config.batch_size} is not divisible by the "
              f"data-parallel size data x fsdp = {shards} (give --batch)", file=sys.stderr)
        return 2
    cfg = DiTConfig.from_config(config.model)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    _, abstract = create.abstract_state(lambda: UniAlignmentDiT(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    by_module = params_by_module(abstract)
    total = sum(by_module.values())
    batch = args.batch or config.batch_size
    result = {
        "params_total": total,
        "params_inference": total - by_module["adapters"],
        "params_by_module": by_module,
        "flops_per_step": {t: flops.step_flops(config, t, batch) for t in tasks_lib.TASKS},
        "global_batch": batch,
        "mesh": dict(mesh.shape),
        "sharding_rules": config.sharding.rules,
        "remat": config.model.remat,
    }
    if args.compile:
        tasks_lib.check_task(args.task, "--task")
        start = time.perf_counter()
        # --batch alone compiles one micro-batch of that size (no accumulation).
        accum = args.accum or (1 if args.batch else None)
        compiled = compile_train_step(config, args.task, batch, accum, mesh, rules, args.latents)
        if accum is None:
            from unialignment_jax.training import schedule as schedule_lib

            accum = schedule_lib.from_config(config).stages[0].accum_steps
        result["compiled_accum_steps"] = accum
        result["compile_seconds"] = round(time.perf_counter() - start, 2)
        result["compiled_task"] = args.task
        result["per_device_micro_batch"] = batch / accum / shards
        result["memory_per_device_bytes"] = memory_report(compiled)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"parameters: {total:,} ({result['params_inference']:,} at inference, without the adapters)")
    for name, n in by_module.items():
        print(f"  {name:18s} {n:>15,}  {100 * n / total:5.1f}%")
    print(f"FLOPs per step at global batch {batch} (analytic, 3x forward for trained passes):")
    for t, f in result["flops_per_step"].items():
        print(f"  {t:10s} {f / 1e12:12.2f} TFLOP")
    if args.compile:
        mem = result["memory_per_device_bytes"]
        print(f"AOT compile of the {args.task} train step on mesh {result['mesh']} "
              f"({result['compile_seconds']} s); per device:")
        for k, v in mem.items():
            print(f"  {k:15s} {v / 2**30:10.3f} GiB")
    return 0
