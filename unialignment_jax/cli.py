"""`unialignment <command>` (also `python -m unialignment_jax`): the command-line contract of DESIGN.md.

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

# command -> (module with `run(args, config)`, needs a --config, help)
COMMANDS = {
    "train": ("unialignment_jax.training.train", True, "train (resumes when --workdir holds a checkpoint)"),
    "inspect": ("unialignment_jax.commands.inspect", True, "parameter counts, FLOPs, AOT per-device memory"),
    "bench": ("unialignment_jax.commands.bench", True, "step time, FLOP/s vs an in-process matmul peak"),
}


def cpu_xla_flags(n_devices: int) -> str:
    """XLA flags for `n` simulated CPU devices. The scheduler flag keeps collectives in one order
    on every device (STACK.md); see also `simulated_device_env`."""
    return (f"--xla_force_host_platform_device_count={n_devices} "
            "--xla_cpu_enable_concurrency_optimized_scheduler=false")


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
            p.add_argument("--config", required=True, help="experiments/x.py[:variant]; override with --config.a.b=v")
        p.add_argument("--cpu_devices", type=int, default=0,
                       help="simulate N devices on the CPU (sets XLA flags before jax is imported)")
        p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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
        if name == "bench":
            p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
            p.add_argument("--tasks", default="t2i", help="comma-separated task shapes to time")
            p.add_argument("--compile_compare", action="store_true",
                           help="also compile with scan_layers on and off and report both compile times")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    if args.cpu_devices:
        if "jax" in sys.modules:
            parser.error("--cpu_devices must be handled before jax is imported")
        os.environ.update(simulated_device_env(args.cpu_devices))

    module_name, needs_config, _ = COMMANDS[args.command]
    config = None
    if needs_config:
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
