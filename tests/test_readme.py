"""The README's commands, as the README writes them: relative paths, from the repository root,
through launch/local.sh where the README uses it.

Every ```bash block of README.md is read here, so a README edit cannot drift from what is tested:
a command this file does not know how to run fails the test. Two kinds of block:

* run (the default): each command runs, in order, in a copy of the repository root (a temporary
  directory whose entries link to this checkout's; `runs/` is its own). Where the README's sizes
  would take minutes, `tiny()` below substitutes smaller ones: the demo's `:tiny` variant (14 steps
  over the same three stages, a checkpoint every 4, a sample grid at the end), fewer evaluation
  examples and sampling steps. The quick-start train command trains every task of the demo's
  schedule and writes a sample grid; run again, as the README says, it resumes from its last
  checkpoint (and, the run being complete, trains nothing more: tests/test_train.py checks that an
  interrupted run resumes bit-exactly).
* check (a block after `<!-- readme-test: check -->`): commands that need weights, data or a pod
  that this machine has not (the 2B walkthrough). Their arguments are parsed by the CLI's own
  parser, their configs loaded and validated (with every override), and launchers run as
  `--dry-run`.

`bash tests/run.sh` (this suite) and the `pip install` lines are the two commands not run here:
CI runs both (.ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from tb_events import summary_kinds  # tests/tb_events.py
from unialignment_jax import cli
from unialignment_jax import config as config_lib
from unialignment_jax.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
NOT_RUN = ("bash tests/run.sh", "pip install")  # run by CI itself (.ci/run)


def readme_commands() -> list[tuple[str, str]]:
    """(kind, command) for every command of every ```bash block, `\\` continuations joined."""
    text = open(README, encoding="utf-8").read()
    out = []
    for m in re.finditer(r"(<!-- readme-test: (\w+) -->\s*\n)?```bash\n(.*?)```", text, re.S):
        kind = m.group(2) or "run"
        assert kind in ("run", "check"), f"README: unknown readme-test kind {kind!r}"
        for line in m.group(3).replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((kind, line))
    return out


def tiny(command: str) -> str:
    """The README command at test sizes (each substitution keeps what the command exercises)."""
    command = re.sub(r"experiments/demo\.py(:[\w,]+)?", "experiments/demo.py:tiny", command)
    if " evaluate " in command:
        command = command.replace("--limit 64", "--limit 2 --steps 2 --text_steps 2")
    if " sample " in command:
        command += " --steps 2"
    return command


def command_name(command: str) -> str:
    words = shlex.split(command)
    if words[0] == "bash":
        words = words[2:]  # bash launch/<x>.sh ...
    while words and words[0].startswith("--"):  # launcher options (--tpu NAME ...)
        words = words[2:]
    return words[0] if words[0] != "unialignment" else words[1]


@pytest.fixture(scope="module")
def readme_root(tmp_path_factory):
    """A copy of the repository root: links to this checkout's entries, and its own runs/."""
    root = tmp_path_factory.mktemp("readme") / "unialignment_jax"
    root.mkdir()
    for name in os.listdir(ROOT):
        if name not in (".venv", "runs", ".git"):
            os.symlink(os.path.join(ROOT, name), root / name)
    return root


def run_in(root, command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, UNIALIGNMENT_VENV=sys.prefix)  # the launcher uses this environment
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(f"{time.perf_counter() - t0:6.1f} s  {command}")  # pytest -s shows where the time goes
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{proc.stderr[-4000:]}"
    return proc


def test_readme_lists_the_commands_it_should():
    commands = [c for _, c in readme_commands()]
    names = {command_name(c) for c in commands if not c.startswith(NOT_RUN)}
    assert {"train", "sample", "evaluate", "export", "import", "prepare", "inspect"} <= names
    assert "bash launch/local.sh train --config experiments/demo.py --workdir runs/demo" in commands
    assert "bash tests/run.sh" in commands


def test_readme_run_commands(readme_root):
    """Every run-kind command, in README order, at tiny sizes; the quick start runs twice."""
    commands = [c for kind, c in readme_commands() if kind == "run" and not c.startswith(NOT_RUN)]
    quick_start = commands[0]
    assert command_name(quick_start) == "train"
    demo = readme_root / "runs" / "demo"
    for i, command in enumerate([quick_start, *commands]):
        proc = run_in(readme_root, tiny(command))
        name = command_name(command)
        if name == "train" and i == 0:
            assert "fresh run" in proc.stderr
            rows = [json.loads(line) for line in (demo / "metrics.jsonl").read_text().splitlines()]
            assert rows[-1]["step"] == 14 and (demo / "checkpoints" / "14").is_dir()
            assert all(r["finite"] == 1.0 for r in rows)
            # Every task of the schedule was compiled and trained (stages that agree on a step's
            # settings share its executable, so each task is compiled once, in its first stage).
            compiled = re.findall(r"compiled the (\w+) step of stage \w+", proc.stderr)
            assert sorted(compiled) == sorted(TASKS), compiled
            # The sample grid of the last step, in samples/ and in TensorBoard.
            assert (demo / "samples" / "step_14.png").exists() and (demo / "samples" / "step_14.txt").exists()
            assert summary_kinds(demo).get("samples/grid") == "image"
            saved = json.loads((demo / "config.json").read_text())
            assert os.path.isabs(saved["compilation_cache_dir"])  # every path absolute
        elif name == "train":
            assert "resumed" in proc.stderr and "at step 14" in proc.stderr, proc.stderr[-2000:]
            assert len((demo / "metrics.jsonl").read_text().splitlines()) == len(rows)  # complete: no more steps
        elif name in ("sample", "export", "prepare"):
            out = shlex.split(command)[shlex.split(command).index("--out") + 1]
            assert (readme_root / out).exists(), f"{command}: wrote no {out}"
        elif name == "import":
            workdir = shlex.split(command)[shlex.split(command).index("--workdir") + 1]
            assert (readme_root / workdir / "checkpoints" / "0").is_dir()
        elif name == "evaluate":
            assert "t2i" in proc.stdout + proc.stderr
        elif name == "inspect":
            assert "GiB" in proc.stdout  # the compiled step's memory per device


def test_readme_check_commands(readme_root, monkeypatch):
    """Commands that need weights or a pod: valid arguments, configs that load with their
    overrides, and launchers' dry runs."""
    monkeypatch.chdir(readme_root)
    checked = 0
    for kind, command in readme_commands():
        if kind != "check":
            continue
        words = shlex.split(command)
        if words[0] == "bash":  # a launcher: its dry run prints what it would run
            proc = run_in(readme_root, f"bash {words[1]} --dry-run {shlex.join(words[2:])}")
            assert "unialignment" in proc.stdout
            words = ["unialignment", *words[words.index(command_name(command)):]]  # the command it runs
        assert words[0] == "unialignment", command
        args, rest = cli.build_parser().parse_known_args(words[1:])
        if getattr(args, "config", None):
            config_lib.load(args.config, rest)  # raises ConfigError naming the key
        else:
            assert not rest, f"{command}: unknown arguments {rest}"
        checked += 1
    assert checked >= 5
