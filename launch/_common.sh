# shellcheck shell=bash disable=SC2034  # sourced: UA_ROOT, UA_NAME... are used by the launchers
# Shared by the launchers (sourced; defines functions and UA_ROOT only).
#
# Conventions every launcher follows:
#   launch/<name>.sh [launcher options] [--] <unialignment command> [its arguments...]
#   --dry-run     print, as a runnable shell script, exactly what would run, and run nothing
#   --chip GEN    XLA / libtpu flag preset: v4 | v5e | v5p | v6e | h100 | h200 | cpu | none
#   --env K=V     extra environment for the training processes (repeatable)
# The presets (below) are logged at start. A user's own XLA_FLAGS / LIBTPU_INIT_ARGS are appended
# after the preset, so a flag given there wins over the preset's value.

UA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UA_DRY_RUN=0
UA_NAME="launch"

ua_log() { echo "[$UA_NAME] $*" >&2; }
ua_usage_error() { echo "$UA_NAME: $*" >&2; exit 2; }

# The jemalloc library the CPU preset preloads when it exists (Debian: libjemalloc2).
UA_JEMALLOC="${UA_JEMALLOC:-/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}"

# FSDP all-gathers overlapped with compute (continuation fusion), for every TPU generation.
UA_TPU_OVERLAP_ALL_GATHER="--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"
# Data-parallel (DCN) gradient all-reduce optimisation, for multi-slice runs.
UA_TPU_DATA_PARALLEL="--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true"
# H100 / H200: latency-hiding scheduler, pipelined (overlapped) FSDP collectives, combined small
# collectives, no command buffers (they serialise with collectives), no XLA remat (the config's
# model.remat decides). Every name is checked against the installed jaxlib by tests/test_launch.py.
UA_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_highest_priority_async_stream=true \
--xla_gpu_enable_command_buffer= \
--xla_gpu_enable_triton_gemm=false \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864 \
--xla_gpu_enable_all_gather_combine_by_dim=false \
--xla_gpu_enable_reduce_scatter_combine_by_dim=false \
--xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_pipelined_all_reduce=true \
--xla_gpu_enable_while_loop_double_buffering=true \
--xla_disable_hlo_passes=rematerialization"
# XLA:CPU: the preset that won `benchmarks/torch_reference_step.py --sweep` (docs/performance.md):
# YNN fusion off plus jemalloc: 3.81 s per medium step against 5.65 s with the defaults, 4.23 s
# with jemalloc alone and 7.05 s with YNN off alone.
UA_CPU_XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type="
# Without jemalloc: glibc malloc told to keep its memory (one arena, no mmap'd chunks, no trimming).
# By default a medium step page-faults ~460k fresh zeroed pages (1.8 GB) as glibc hands XLA's big
# buffers back to the kernel and asks again; with this, none after the warm-up: 5.02 s against
# 6.81 s per step (with the default XLA flags; YNN off on top: 5.61 s). The memory stays with the
# process (its high-water mark), as it would with jemalloc.
UA_GLIBC_RETAIN="glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:\
glibc.malloc.top_pad=268435456"

# ua_chip_env CHIP: the preset's environment as NAME=VALUE lines (one per variable).
ua_chip_env() {
  local chip="$1"
  case "$chip" in
    v4) echo "LIBTPU_INIT_ARGS=$UA_TPU_OVERLAP_ALL_GATHER" ;;
    v5p|v5e) echo "LIBTPU_INIT_ARGS=$UA_TPU_OVERLAP_ALL_GATHER $UA_TPU_DATA_PARALLEL" ;;
    v6e) echo "LIBTPU_INIT_ARGS=$UA_TPU_OVERLAP_ALL_GATHER $UA_TPU_DATA_PARALLEL --xla_tpu_scoped_vmem_limit_kib=98304" ;;
    h100|h200)
      echo "XLA_FLAGS=$UA_GPU_XLA_FLAGS"
      echo "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"
      echo "CUDA_DEVICE_MAX_CONNECTIONS=1"
      ;;
    cpu)
      # YNN fusion off only together with jemalloc (alone it was slower than the defaults).
      if [ -e "$UA_JEMALLOC" ]; then
        echo "XLA_FLAGS=$UA_CPU_XLA_FLAGS"
        echo "LD_PRELOAD=$UA_JEMALLOC"
      else
        echo "GLIBC_TUNABLES=$UA_GLIBC_RETAIN"
      fi
      ;;
    none) ;;
    *) ua_usage_error "--chip $chip: choose v4, v5e, v5p, v6e, h100, h200, cpu or none" ;;
  esac
}

# ua_check_chip CHIP: exit 2 unless CHIP has a preset (ua_chip_env runs in a subshell, whose exit
# would not stop the launcher).
ua_check_chip() {
  case "$1" in v4|v5e|v5p|v6e|h100|h200|cpu|none) ;;
    *) ua_usage_error "--chip $1: choose v4, v5e, v5p, v6e, h100, h200, cpu or none" ;;
  esac
}

# ua_env_lines CHIP [K=V...]: the preset, then the user's XLA_FLAGS / LIBTPU_INIT_ARGS appended to
# the preset's (later flags win), then the --env extras, as NAME=VALUE lines.
ua_env_lines() {
  local chip="$1"; shift
  local line name value
  local -A seen=()
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    name="${line%%=*}"; value="${line#*=}"
    case "$name" in
      XLA_FLAGS|LIBTPU_INIT_ARGS)
        if [ -n "${!name:-}" ]; then value="$value ${!name}"; fi ;;
    esac
    seen[$name]=1
    echo "$name=$value"
  done < <(ua_chip_env "$chip")
  for name in XLA_FLAGS LIBTPU_INIT_ARGS; do
    if [ -z "${seen[$name]:-}" ] && [ -n "${!name:-}" ]; then echo "$name=${!name}"; fi
  done
  for line in "$@"; do echo "$line"; done
}

# ua_log_env LINES...: log the environment a launcher sets (at start, also in real runs).
ua_log_env() {
  local line
  for line in "$@"; do ua_log "env $line"; done
}

# ua_q ARG: ARG quoted for any POSIX shell (as-is when safe, else in single quotes).
ua_q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# ua_quote ARGS...: the arguments as one shell-quoted string.
ua_quote() {
  local out="" a
  for a in "$@"; do out+="$(ua_q "$a") "; done
  printf '%s' "${out% }"
}

# ua_exports LINES...: `export NAME=VALUE; ...` (shell-quoted) for a remote or srun'd shell.
ua_exports() {
  local out="" line
  for line in "$@"; do out+="export ${line%%=*}=$(ua_q "${line#*=}"); "; done
  printf '%s' "$out"
}

# ua_run ARGS...: run a command, or in a dry run print it (shell-quoted) instead.
ua_run() {
  if [ "$UA_DRY_RUN" = 1 ]; then
    ua_quote "$@"; echo
  else
    ua_log "run: $(ua_quote "$@")"
    "$@"
  fi
}

# ua_exec ARGS...: like ua_run, but the launcher becomes the command (signals such as SIGTERM, a
# preemption notice, reach it directly).
ua_exec() {
  if [ "$UA_DRY_RUN" = 1 ]; then
    ua_quote "$@"; echo
    exit 0
  fi
  ua_log "exec: $(ua_quote "$@")"
  exec "$@"
}

# ua_check_command ARGS...: a `unialignment` command line; `train` needs --config and --workdir.
ua_check_command() {
  [ $# -ge 1 ] || ua_usage_error "no unialignment command given (e.g. train --config C --workdir W)"
  case "$1" in -*) ua_usage_error "unknown launcher option $1 (or a missing command before it)" ;; esac
  if [ "$1" = train ]; then
    local a has_config=0 has_workdir=0
    for a in "$@"; do
      case "$a" in --config|--config=*) has_config=1 ;; --workdir|--workdir=*) has_workdir=1 ;; esac
    done
    [ "$has_config" = 1 ] || ua_usage_error "train needs --config experiments/x.py"
    [ "$has_workdir" = 1 ] || ua_usage_error "train needs --workdir W (a gs:// URI on pods and clusters)"
  fi
}

# ua_has_override PREFIX ARGS...: whether the command line already sets --config.PREFIX...
ua_has_override() {
  local prefix="$1" a; shift
  for a in "$@"; do case "$a" in "--config.$prefix"*) return 0 ;; esac; done
  return 1
}

# ua_first_slurm_host NODELIST: the first host of a Slurm node list without scontrol
# ('gpu007' / 'gpu007,gpu009' / 'gpu[007-010,012],cpu1' -> gpu007), as jax's Slurm detection parses it.
ua_first_slurm_host() {
  local list="$1" prefix rest
  prefix="${list%%[\[,]*}"
  if [ "$prefix" = "$list" ] || [ "${list:${#prefix}:1}" = "," ]; then
    echo "$prefix"
  else
    rest="${list:${#prefix}+1}"
    echo "$prefix${rest%%[-,\]]*}"
  fi
}
