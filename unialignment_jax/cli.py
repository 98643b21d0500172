"""`unialignment <command>` (also `python -m unialignment_jax`): the command-line contract
(the commands and flags README.md documents, which other tools rely on).

Every command's arguments are declared here, in one place; the command itself lives in its
concern's folder and is imported only after the XLA flags are set (`--cpu_devices` must act
before jax is imported). Config overrides (`--config.a.b=v`) are the arguments left over.

Exit codes: 0 success, 1 a failure while running, 2 bad arguments or config (nothing written).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from unialignment_jax import paths  # imports no jax

# command -> (module with `run(args, config)`, --config: True required | "optional" | False, help)
COMMANDS = {
    "train": ("unialignment_jax.training.train", True, "train (resumes when --workdir holds a checkpoint)"),
    "inspect": ("unialignment_jax.commands.inspect", True, "parameter counts, FLOPs, AOT per-device memory"),
    "bench": ("unialignment_jax.commands.bench", True, "step time, FLOP/s vs an in-process matmul peak"),
    "prepare": ("unialignment_jax.data.prepare", "optional",
                "official-format JSONL manifest -> ArrayRecord dataset (TFDS); bad rows reported and skipped"),
    "export": ("unialignment_jax.interop.export", False,
               "a run's weights as PyTorch safetensors (official UniAlignment or diffusers SD3 layout)"),
    "import": ("unialignment_jax.interop.import_weights", True,
               "start a run (step 0) from SD3 / official UniAlignment safetensors weights"),
    "convert-mask": ("unialignment_jax.interop.convert_mask", "optional",
                     "the official MASK row (a torch .pth) as the safetensors file text_encoder.mask_embedding reads"),
    "sample": ("unialignment_jax.sampling.command", False,
               "run one task (t2i, edit, perception, compose, caption, vqa) with a trained run's weights"),
    "evaluate": ("unialignment_jax.evaluation.command", False,
                 "an evaluation suite (val_loss, shapes, semgen) on a trained run"),
}

# What an optional --config is for, per command.
OPTIONAL_CONFIG_HELP = {
    "prepare": " (optional: supplies defaults such as codec.* for --latents)",
    "convert-mask": " (optional: the row's width must equal its text_encoder.d_model)",
}


# Arguments that name files or directories. They are made absolute once, where the command starts
# (`paths.absolute`: ~ expanded, URIs kept), so that nothing downstream depends on the directory the
# command was started from: Orbax refuses relative paths, and what a run records (config.json,
# export_info.json, the SemGen tree) must still resolve for a command started elsewhere.
PATH_ARGUMENTS = ("workdir", "out", "data", "source", "manifest", "images_root", "image", "teacher_path", "prompts")


def make_path_arguments_absolute(args: argparse.Namespace) -> None:
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [paths.absolute(v) for v in value])
        elif isinstance(value, str):
            setattr(args, name, paths.absolute(value))


def cpu_xla_flags(n_devices: int) -> str:
    """XLA flags for `n` simulated CPU devices. The scheduler flag keeps collectives in one order
    on every device (docs/scaling.md, "Simulated devices"); the longer collective timeout keeps a
    loaded machine (8 device threads on 2 cores) from aborting a slow rendezvous; see also `simulated_device_env`."""
    return (f"--xla_force_host_platform_device_count={n_devices} "
            "--xla_cpu_enable_concurrency_optimized_scheduler=false "
            "--xla_cpu_collective_call_terminate_timeout_seconds=600")


def simulated_device_env(n_devices: int) -> dict[str, str]:
    """Environment for `n` simulated CPU devices, set before jax is imported.

    Besides the XLA flags, asynchronous dispatch is switched off: with it on, the compose step on a
    data=2 x fsdp=4 mesh deadlocked in XLA:CPU's in-process all-gather on its first execution
    (3 of 3 runs), although every step was blocked on; with it off, every run passed.
    """
    return {
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + cpu_xla_flags(n_devices)).strip(),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false",
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unialignment", description="UniAlignment training framework (JAX).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, needs_config, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if needs_config:
            p.add_argument("--config", required=needs_config is True,
                           help="experiments/x.py[:variant]; override with --config.a.b=v"
                                + ("" if needs_config is True else OPTIONAL_CONFIG_HELP[name]))
        p.add_argument("--cpu_devices", type=int, default=0,
                       help="simulate N devices on the CPU (sets XLA flags before jax is imported)")
        p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if name == "prepare":
            from unialignment_jax.data import prepare_args  # no jax import

            prepare_args.add_arguments(p)
        if name == "export":
            p.add_argument("--workdir", required=True, help="the run to export (reads W/config.json, W/checkpoints)")
            p.add_argument("--out", required=True, help="output folder (created; must not exist or be empty)")
            p.add_argument("--format", default="official", choices=["official", "diffusers"],
                           help="official: the official class's state dict; diffusers: SD3Transformer2DModel "
                                "layout + unialignment_extra.safetensors")
            p.add_argument("--ema", action="store_true", help="export the EMA weights")
            p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
        if name == "import":
            p.add_argument("--source", required=True,
                           help="SD3 diffusers transformer folder, official UniAlignment / Dual Diffusion "
                                "safetensors (file or folder), or an `export` folder")
            p.add_argument("--workdir", required=True, help="the new run's directory (must hold no checkpoint)")
            p.add_argument("--allow-missing", dest="allow_missing", action="store_true",
                           help="initialise tensors the source lacks as a fresh run would (listed in the report)")
            p.add_argument("--allow-unexpected", dest="allow_unexpected", action="store_true",
                           help="drop source tensors the model has no place for (listed in the report)")
        if name == "convert-mask":
            p.add_argument("--source", required=True,
                           help="the official checkpoint/mask_token_emb.00-of-01.pth (read with torch.load, "
                                "weights_only=True: tensors only)")
            p.add_argument("--out", required=True, help="the .safetensors file to write (must not exist)")
        if name == "train":
            p.add_argument("--workdir", required=True, help="run directory (checkpoints, TensorBoard, metrics)")
        if name in ("inspect", "bench"):
            p.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "inspect":
            p.add_argument("--compile", action="store_true",
                           help="AOT-compile the train computation on the configured mesh and report memory")
            p.add_argument("--task", default="t2i", help="task shape to compile (t2i, edit, compose, caption)")
            p.add_argument("--batch", type=int, default=0,
                           help="global batch to compile (default: config.batch_size)")
            p.add_argument("--accum", type=int, default=0,
                           help="micro-batches per step to compile (default: the stage's; 1 with --batch)")
            p.add_argument("--latents", action="store_true",
                           help="compile for precomputed latents (default: pixels, the codec encodes in the step)")
            p.add_argument("--mesh", default="",
                           help="mesh to plan for, DATA,FSDP,TENSOR (one may be -1), e.g. 1,-1,1 or 2,32,1; "
                                "overrides config.mesh.{data,fsdp,tensor}")
        if name == "bench":
            p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
            p.add_argument("--tasks", default="t2i", help="comma-separated task shapes to time")
            p.add_argument("--compile_compare", action="store_true",
                           help="also compile the step scanned vs unrolled, and with 24 vs 8 layers")
            p.add_argument("--pixels", action="store_true",
                           help="feed pixels (the codec's encoder runs in the step); default: precomputed latents")
            p.add_argument("--data_seconds", type=float, default=0.0,
                           help="also measure the data pipeline for this long per task (headroom over the step)")
            p.add_argument("--sampler_steps", type=int, default=0,
                           help="also time the image sampler's loop of this many Euler steps against the bare forward")
        if name in ("sample", "evaluate"):
            p.add_argument("--workdir", required=True, help="a training run (reads W/config.json, W/checkpoints)")
            p.add_argument("--ema", action="store_true", help="use the EMA weights")
            p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
            p.add_argument("--seed", type=int, default=0, help="sampling seed")
            p.add_argument("--shift", type=float, default=3.0,
                           help="timestep shift of the image sampler's sigma grid (official: 3.0, as SD3)")
            p.add_argument("--text_order", default="confidence", choices=["confidence", "random"],
                           help="text sampler's unmasking order: most confident positions first (default) or "
                                "random (official ddpm_cache)")
            p.add_argument("--temperature", type=float, default=0.0,
                           help="text sampler, confidence order: temperature of its draws (0: argmax)")
        if name == "sample":
            from unialignment_jax.tasks import TASKS  # no jax import

            p.add_argument("--task", required=True, choices=TASKS)
            p.add_argument("--prompt", default=None,
                           help="prompt (t2i), instruction (edit, perception, compose) or question (vqa)")
            p.add_argument("--prompts", default=None,
                           help="t2i: a text file with one prompt per line; --out is one grid PNG of them")
            p.add_argument("--batch", type=int, default=0,
                           help="with --prompts: examples per compiled sampler call (default: data x fsdp)")
            p.add_argument("--image", action="extend", nargs="+", default=[],
                           help="condition image(s): one for edit/perception/caption/vqa, "
                                "input.num_compose_refs for compose")
            p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 image, 32 text)")
            p.add_argument("--cfg", type=float, default=7.0, help="guidance scale (<= 1: no guidance)")
            p.add_argument("--negative_prompt", default=None,
                           help="negative prompt of the guidance (default: the official one)")
            p.add_argument("--out", required=True,
                           help="output file: PNG for image tasks (a grid with --prompts), text for caption/vqa")
        if name == "evaluate":
            p.add_argument("--suite", required=True, choices=["val_loss", "shapes", "semgen"])
            p.add_argument("--out", default=None,
                           help="output folder (default: W/eval/<suite>...; semgen: the results root, W/results)")
            p.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
            p.add_argument("--limit", type=int, default=None,
                           help="examples per task (default: val_loss 256, shapes 64, semgen all 150)")
            p.add_argument("--tasks", default="", help="comma-separated subset of the suite's tasks")
            p.add_argument("--steps", type=int, default=None, help="image sampling steps (default 50)")
            p.add_argument("--text_steps", type=int, default=None, help="text sampling steps (default 32)")
            p.add_argument("--cfg", type=float, default=None,
                           help="guidance scale (default: 7; semgen: 7 for t2i, 9 for edits)")
            p.add_argument("--split", default="test", choices=["validation", "test"],
                           help="Shapes split of the shapes suite")
            p.add_argument("--batch", type=int, default=0, help="examples per compiled sampler call")
            p.add_argument("--method", default=None, help="semgen: the method's folder name (default: the workdir's)")
            p.add_argument("--data", default=None,
                           help="semgen: the SemGen-Bench folder (semgen_bench.jsonl + images/; required)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    make_path_arguments_absolute(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    if args.cpu_devices:
        if "jax" in sys.modules:
            parser.error("--cpu_devices must be handled before jax is imported")
        os.environ.update(simulated_device_env(args.cpu_devices))

    module_name, needs_config, _ = COMMANDS[args.command]
    config = None
    if needs_config is True or (needs_config and args.config):
        from unialignment_jax import config as config_lib

        try:
            config = config_lib.load(args.config, rest)
        except config_lib.ConfigError as e:
            print(f"unialignment {args.command}: config error: {e}", file=sys.stderr)
            return 2
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    module = importlib.import_module(module_name)
    return int(module.run(args, config) or 0)


if __name__ == "__main__":
    sys.exit(main())
