#!/usr/bin/env bash
# Local launcher: runs any `unialignment` command on this machine, installing the package into
# ./.venv first if needed. On a machine without accelerators it simulates 8 CPU devices (override
# with --cpu_devices N, or UNIALIGNMENT_CPU_DEVICES=0 to use one plain CPU device).
#
#   bash launch/local.sh train --config experiments/demo.py --workdir runs/demo
#   bash launch/local.sh --dry-run train --config experiments/demo.py --workdir runs/demo
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_venv.sh
source "$here/_venv.sh"

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ $# -ge 1 ] || { echo "usage: launch/local.sh [--dry-run] <command> [args...]" >&2; exit 2; }

args=("$@")
cpu_devices="${UNIALIGNMENT_CPU_DEVICES:-8}"
has_accel=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_accel=1; fi
if [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then has_accel=1; fi
if [ "$has_accel" = 0 ] && [ "$cpu_devices" != 0 ] && [[ " ${args[*]} " != *" --cpu_devices"* ]]; then
  args+=(--cpu_devices "$cpu_devices")
fi

if [ "$dry_run" = 1 ]; then
  printf 'would run: unialignment'; printf ' %q' "${args[@]}"; printf '\n'
  exit 0
fi
ensure_venv ""
exec "$VENV/bin/unialignment" "${args[@]}"
