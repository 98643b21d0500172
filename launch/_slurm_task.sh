#!/usr/bin/env bash
# One Slurm task of launch/slurm_gpu.sbatch (srun runs it once per task): turns the SLURM_*
# variables into jax.distributed's arguments and runs the command.
#   coordinator   UA_COORDINATOR (the job's first node, set by slurm_gpu.sbatch)
#   processes     SLURM_NTASKS;  process id  SLURM_PROCID
#   GPUs          one task per node: all UA_GPUS_PER_NODE GPUs; one task per GPU: GPU SLURM_LOCALID
# (jax's own Slurm detection would give every process the single GPU SLURM_LOCALID, which starves
# a process-per-node job, so the arguments are passed explicitly.)
#   bash launch/_slurm_task.sh [--dry-run] <unialignment command> [args...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"
UA_NAME="launch/_slurm_task.sh"
if [ "${1:-}" = "--dry-run" ]; then UA_DRY_RUN=1; shift; fi
ua_check_command "$@"
: "${SLURM_PROCID:?not inside a Slurm task (run through srun from launch/slurm_gpu.sbatch)}"
: "${SLURM_NTASKS:?not inside a Slurm task}"
: "${UA_COORDINATOR:?set by launch/slurm_gpu.sbatch}"
gpus="${UA_GPUS_PER_NODE:-8}"
nodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
tasks_per_node=$((SLURM_NTASKS / nodes))
if [ "$tasks_per_node" -le 1 ]; then
  devices="$(seq -s, 0 $((gpus - 1)))"
else
  devices="${SLURM_LOCALID:?SLURM_LOCALID is not set}"
fi
args=("$@")
if ! ua_has_override distributed.coordinator_address "${args[@]}"; then
  args+=("--config.distributed.coordinator_address=$UA_COORDINATOR"
         "--config.distributed.num_processes=$SLURM_NTASKS"
         "--config.distributed.process_id=$SLURM_PROCID"
         "--config.distributed.local_device_ids=$devices")
fi
ua_log "process $SLURM_PROCID of $SLURM_NTASKS on $(hostname): GPUs $devices, coordinator $UA_COORDINATOR"
ua_log "env XLA_FLAGS=${XLA_FLAGS:-}"
ua_exec "${UNIALIGNMENT_VENV:-$UA_ROOT/.venv}/bin/unialignment" "${args[@]}"
