#!/usr/bin/env bash
# xpk (GKE) launcher for one or more TPU slices: `xpk workload create` builds an image from this
# checkout (on top of --base-docker-image) and runs the same command in every worker of every
# slice. With --num-slices N > 1 the slices are joined over the data-centre network: the launcher
# sets --config.mesh.dcn_data=N (or dcn_fsdp with --dcn-axis fsdp), so only that mesh axis crosses
# DCN (parallel/mesh.py: hybrid ICI x DCN mesh); jax finds the slices through xpk's MEGASCALE_* and
# TPU_* variables, and --config.distributed.mode=on makes every worker join.
#
#   bash launch/xpk.sh --cluster my-gke --tpu-type v5p-256 --num-slices 2 --zone us-east5-a \
#       train --config experiments/unialignment_2b.py --workdir gs://BUCKET/runs/ua2b
#
# Options (before the command):
#   --cluster NAME            the GKE cluster xpk created                               (required)
#   --tpu-type TYPE           e.g. v5p-256, v5litepod-256, v6e-256, v4-128                (required)
#   --num-slices N            slices (default 1)
#   --zone ZONE / --project P passed to xpk
#   --chip GEN                flag preset (default: from --tpu-type)
#   --workload NAME           workload name (default ua-<date>-<time>)
#   --dcn-axis data|fsdp      the mesh axis that spans slices (default data)
#   --base-docker-image IMG   image the checkout is layered on (default python:3.11); the package is
#                             pip-installed with [tpu] when the workload starts
#   --docker-image IMG        a ready image with the package installed (no install at start)
#   --env K=V                 extra environment for the training processes (repeatable)
#   --dry-run                 print exactly what would run and run nothing
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"
UA_NAME="launch/xpk.sh"

cluster="" tpu_type="" num_slices=1 zone="" project="" chip="" workload="" dcn_axis=data
base_image="python:3.11" image=""
extra_env=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) cluster="${2:?--cluster needs a value}"; shift 2 ;;
    --tpu-type) tpu_type="${2:?--tpu-type needs a value}"; shift 2 ;;
    --num-slices) num_slices="${2:?--num-slices needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --chip) chip="${2:?--chip needs a value}"; shift 2 ;;
    --workload) workload="${2:?--workload needs a value}"; shift 2 ;;
    --dcn-axis) dcn_axis="${2:?--dcn-axis needs a value}"; shift 2 ;;
    --base-docker-image) base_image="${2:?--base-docker-image needs a value}"; shift 2 ;;
    --docker-image) image="${2:?--docker-image needs a value}"; shift 2 ;;
    --env) extra_env+=("${2:?--env needs K=V}"); shift 2 ;;
    --dry-run) UA_DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ -n "$cluster" ] || ua_usage_error "--cluster NAME is required"
[ -n "$tpu_type" ] || ua_usage_error "--tpu-type TYPE is required (e.g. v5p-256)"
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || ua_usage_error "--num-slices $num_slices: a positive integer"
case "$dcn_axis" in data|fsdp) ;; *) ua_usage_error "--dcn-axis $dcn_axis: data or fsdp" ;; esac
if [ -z "$chip" ]; then
  case "$tpu_type" in
    v4-*) chip=v4 ;;
    v5p-*) chip=v5p ;;
    v5litepod-*|v5e-*) chip=v5e ;;
    v6e-*) chip=v6e ;;
    *) ua_usage_error "--tpu-type $tpu_type: cannot tell the chip; give --chip" ;;
  esac
fi
case "$chip" in v4|v5e|v5p|v6e|none) ;; *) ua_usage_error "--chip $chip: xpk takes v4, v5e, v5p, v6e or none" ;; esac
workload="${workload:-ua-$(date +%m%d-%H%M%S)}"
ua_check_command "$@"
command_args=("$@")
if [ "$num_slices" -gt 1 ] && ! ua_has_override mesh.dcn_ "${command_args[@]}"; then
  command_args+=("--config.mesh.dcn_$dcn_axis=$num_slices")
fi
if ! ua_has_override distributed.mode "${command_args[@]}"; then
  command_args+=(--config.distributed.mode=on)
fi

mapfile -t env_lines < <(ua_env_lines "$chip" "${extra_env[@]+"${extra_env[@]}"}")
inner="$(ua_exports "${env_lines[@]+"${env_lines[@]}"}")"
inner+="echo \"[\$(hostname)] LIBTPU_INIT_ARGS=\${LIBTPU_INIT_ARGS:-}\" >&2; "
xpk_args=(workload create --cluster "$cluster" --workload "$workload" --tpu-type="$tpu_type"
          --num-slices="$num_slices")
if [ -n "$zone" ]; then xpk_args+=(--zone="$zone"); fi
if [ -n "$project" ]; then xpk_args+=(--project="$project"); fi
if [ -n "$image" ]; then
  xpk_args+=(--docker-image="$image")
  inner+="exec unialignment $(ua_quote "${command_args[@]}")"
else
  xpk_args+=(--base-docker-image="$base_image" --script-dir="$UA_ROOT")
  inner+="pip install --quiet -e '.[tpu]' && exec unialignment $(ua_quote "${command_args[@]}")"
fi
xpk_args+=(--command "$inner")  # xpk runs it with bash in every worker

[ "$UA_DRY_RUN" = 1 ] && echo "# $UA_NAME dry run: $num_slices x $tpu_type on $cluster, chip $chip"
ua_log "workload $workload: $num_slices x $tpu_type on cluster $cluster, chip preset $chip"
ua_log_env "${env_lines[@]+"${env_lines[@]}"}"
ua_exec xpk "${xpk_args[@]}"
