#!/usr/bin/env bash
# Local launcher: runs any `unialignment` command on this machine, installing the package into
# ./.venv first if needed. On a machine without accelerators it simulates 8 CPU devices (override
# with --cpu_devices N, or UNIALIGNMENT_CPU_DEVICES=0 to use one plain CPU device) and applies the
# CPU flag preset (the XLA:CPU flags that won the benchmarks, and jemalloc when installed).
#
#   bash launch/local.sh train --config experiments/demo.py --workdir runs/demo
#   bash launch/local.sh --dry-run train --config experiments/demo.py --workdir runs/demo
#   UNIALIGNMENT_CPU_DEVICES=1 bash launch/local.sh bench --config experiments/bench_medium.py
#
# Options (before the command):
#   --chip GEN   flag preset: auto (default: h100 / h200 from nvidia-smi, none on TPU, else cpu),
#                v4 | v5e | v5p | v6e | h100 | h200 | cpu | none
#   --env K=V    extra environment (repeatable)
#   --dry-run    print exactly what would run and run nothing
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_venv.sh
source "$here/_venv.sh"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"
UA_NAME="launch/local.sh"

chip=auto
extra_env=()
while [ $# -gt 0 ]; do
  case "$1" in
    --chip) chip="${2:?--chip needs a value}"; shift 2 ;;
    --env) extra_env+=("${2:?--env needs K=V}"); shift 2 ;;
    --dry-run) UA_DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || ua_usage_error "usage: launch/local.sh [--dry-run] [--chip GEN] <command> [args...]"
ua_check_command "$@"

args=("$@")
gpu_name=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
fi
has_tpu=0
if [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then has_tpu=1; fi
if [ "$chip" = auto ]; then
  case "$gpu_name" in
    *H200*) chip=h200 ;;
    *H100*) chip=h100 ;;
    "") if [ "$has_tpu" = 1 ]; then chip=none; else chip=cpu; fi ;;
    *) chip=none ;;
  esac
fi
ua_check_chip "$chip"
cpu_devices="${UNIALIGNMENT_CPU_DEVICES:-8}"
if [ -z "$gpu_name" ] && [ "$has_tpu" = 0 ] && [ "$cpu_devices" != 0 ] \
   && [[ " ${args[*]} " != *" --cpu_devices"* ]]; then
  args+=(--cpu_devices "$cpu_devices")
fi

mapfile -t env_lines < <(ua_env_lines "$chip" "${extra_env[@]+"${extra_env[@]}"}")
[ "$UA_DRY_RUN" = 1 ] && echo "# $UA_NAME dry run: chip preset $chip"
ua_log "chip preset $chip"
ua_log_env "${env_lines[@]+"${env_lines[@]}"}"
if [ "$UA_DRY_RUN" = 0 ]; then ensure_venv ""; else VENV="${UNIALIGNMENT_VENV:-$UA_ROOT/.venv}"; fi
ua_exec env "${env_lines[@]+"${env_lines[@]}"}" "$VENV/bin/unialignment" "${args[@]}"
