#!/usr/bin/env bash
# Packaging check (CI runs it after the tests): a regular, non-editable `pip install .` into a fresh
# virtual environment gives a working `unialignment` outside the checkout: --help, the demo config's
# inspect, and a few demo training steps, all from a directory that holds no source.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${UNIALIGNMENT_PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --upgrade pip
"$tmp/venv/bin/pip" install --quiet "$root"
cd "$tmp"
where="$("$tmp/venv/bin/python" -c "import unialignment_jax; print(unialignment_jax.__file__)")"
case "$where" in
  "$root"/*) echo "check_install: unialignment_jax imports from the checkout ($where)" >&2; exit 1 ;;
esac
"$tmp/venv/bin/unialignment" --help >/dev/null
"$tmp/venv/bin/unialignment" inspect --config "$root/experiments/demo.py" --cpu_devices 8 >/dev/null
"$tmp/venv/bin/unialignment" train --config "$root/experiments/demo.py:tiny" --workdir runs/demo --cpu_devices 8 \
  --config.stages.generation.steps=2 --config.stages.editing.steps=1 --config.stages.unified.steps=1 \
  --log_level WARNING
test -d runs/demo/checkpoints/4 || { echo "check_install: the demo wrote no checkpoint" >&2; exit 1; }
echo "check_install: pip install . (not editable) works: --help, inspect, train"
