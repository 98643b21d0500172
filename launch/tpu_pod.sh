#!/usr/bin/env bash
# TPU VM pod launcher: copies this checkout to every worker of a pod slice, installs it there
# (./.venv with the [tpu] extra), and runs the same `unialignment` command on all workers at once
# (`gcloud compute tpus tpu-vm ssh --worker=all`). jax finds the other workers by itself on TPU
# VMs; the launcher adds --config.distributed.mode=on so that every worker joins.
#
#   bash launch/tpu_pod.sh --tpu my-v5p-128 --zone us-east5-a --chip v5p \
#       train --config experiments/unialignment_2b.py --workdir gs://BUCKET/runs/ua2b
#   bash launch/tpu_pod.sh --dry-run --tpu my-v5p-128 --zone us-east5-a --chip v5p train ...
#
# Options (before the command):
#   --tpu NAME          the TPU VM (pod slice) name                                   (required)
#   --zone ZONE         its zone                                                      (required)
#   --project PROJECT   the GCP project (default: gcloud's configured one)
#   --chip GEN          flag preset: v4 | v5e | v5p | v6e | none                      (required)
#   --dir DIR           checkout directory on the workers, relative to $HOME (default unialignment_jax)
#   --no-install        skip copying and installing (the workers already have this checkout)
#   --detach            run with nohup, output to DIR/logs/<time>.log on each worker; return at once
#   --ssh-flag FLAG     extra flag for gcloud ssh/scp, e.g. --ssh-flag=--internal-ip (repeatable)
#   --env K=V           extra environment for the training processes (repeatable)
#   --dry-run           print exactly what would run (a shell script) and run nothing
# Workers need Python >= 3.11 (jax 0.10); set UNIALIGNMENT_PYTHON on them to pick another python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"
UA_NAME="launch/tpu_pod.sh"

tpu="" zone="" project="" chip="" remote_dir="unialignment_jax" install=1 detach=0
ssh_flags=() extra_env=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) tpu="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --chip) chip="${2:?--chip needs a value}"; shift 2 ;;
    --dir) remote_dir="${2:?--dir needs a value}"; shift 2 ;;
    --no-install) install=0; shift ;;
    --detach) detach=1; shift ;;
    --ssh-flag=*) ssh_flags+=("${1#--ssh-flag=}"); shift ;;
    --ssh-flag) ssh_flags+=("${2:?--ssh-flag needs a value}"); shift 2 ;;
    --env) extra_env+=("${2:?--env needs K=V}"); shift 2 ;;
    --dry-run) UA_DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ -n "$tpu" ] || ua_usage_error "--tpu NAME is required"
[ -n "$zone" ] || ua_usage_error "--zone ZONE is required"
case "$chip" in
  v4|v5e|v5p|v6e|none) ;;
  "") ua_usage_error "--chip is required (v4, v5e, v5p, v6e or none)" ;;
  *) ua_usage_error "--chip $chip: a TPU pod takes v4, v5e, v5p, v6e or none" ;;
esac
ua_check_command "$@"
command_args=("$@")
if ! ua_has_override distributed.mode "${command_args[@]}"; then
  command_args+=(--config.distributed.mode=on)
fi

mapfile -t env_lines < <(ua_env_lines "$chip" "${extra_env[@]+"${extra_env[@]}"}")
gcloud_target=(--zone="$zone")
if [ -n "$project" ]; then gcloud_target+=(--project="$project"); fi
gcloud_target+=("${ssh_flags[@]+"${ssh_flags[@]}"}")

[ "$UA_DRY_RUN" = 1 ] && echo "# $UA_NAME dry run: TPU $tpu (zone $zone), chip $chip, all workers"
ua_log "TPU $tpu, zone $zone, chip preset $chip, checkout ~/$remote_dir on every worker"
ua_log_env "${env_lines[@]+"${env_lines[@]}"}"

if [ "$install" = 1 ]; then
  tarball="${TMPDIR:-/tmp}/unialignment_src.tgz"
  ua_run tar -C "$UA_ROOT" -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./runs \
    --exclude=__pycache__ --exclude=./.pytest_cache .
  ua_run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:unialignment_src.tgz" --worker=all "${gcloud_target[@]}"
  setup="set -e; mkdir -p $(ua_q "$remote_dir"); tar -xzf unialignment_src.tgz -C $(ua_q "$remote_dir"); "
  setup+="cd $(ua_q "$remote_dir"); source launch/_venv.sh; ensure_venv '[tpu]'"
  ua_run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_target[@]}" --command="$setup"
fi

remote="cd $(ua_q "$remote_dir") && $(ua_exports "${env_lines[@]+"${env_lines[@]}"}")"
remote+="echo \"[\$(hostname)] LIBTPU_INIT_ARGS=\${LIBTPU_INIT_ARGS:-}\" >&2; "
run=".venv/bin/unialignment $(ua_quote "${command_args[@]}")"
if [ "$detach" = 1 ]; then
  remote+="mkdir -p logs && log=logs/\$(date +%Y%m%d-%H%M%S)-\$(hostname).log && "
  remote+="nohup $run > \"\$log\" 2>&1 < /dev/null & echo \"[\$(hostname)] detached, log: $remote_dir/\$log\""
else
  remote+="exec $run"
fi
ua_exec gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_target[@]}" --command="$remote"
