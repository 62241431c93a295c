#!/usr/bin/env bash
# realm-jax on GKE with xpk (https://github.com/AI-Hypercomputer/xpk): the trainer and the
# refresher as two xpk workloads (JobSets) on an existing xpk cluster, each on its own TPU
# slices; every pod runs the same command and jax.distributed joins them into one job.
#
#   launch/xpk.sh [--dry_run] train CONFIG WORKDIR [--config.field=value ...]
#   launch/xpk.sh [--dry_run] refresh CONFIG WORKDIR [--config.field=value ...]
#   launch/xpk.sh [--dry_run] list                      # the cluster's workloads
#   launch/xpk.sh [--dry_run] wait [train|refresh]      # until that workload completes
#   launch/xpk.sh [--dry_run] delete [train|refresh]    # one workload (default: both)
#
# xpk layers this checkout (--script-dir) onto BASE_IMAGE and installs it in each pod (or
# runs DOCKER_IMAGE as it is when set). WORKDIR must be a folder both workloads see: an
# xpk storage (`xpk storage attach NAME --type=gcsfuse|gcpfilestore --mount-point=/mnt/...`)
# named in STORAGE. The trainer restarts from its last checkpoint after a failure
# (MAX_RESTARTS); the refresher stops by itself when the trainer has finished.
#
# Knobs (environment):
#   CLUSTER          realm-jax              the xpk cluster
#   ZONE             us-west4-a             its zone
#   PROJECT          (gcloud's default)     Google Cloud project
#   TPU_TYPE         v5litepod-16           the trainer's slice type
#   NUM_SLICES       1                      the trainer's slices
#   REFRESH_TPU_TYPE v5litepod-8            the refresher's slice type (one slice)
#   BASE_IMAGE       python:3.11            image this checkout is layered onto
#   DOCKER_IMAGE     (none)                 a ready image instead (realm-jax installed)
#   STORAGE          (none)                 xpk storage holding WORKDIR
#   NAME             realm-jax              workload names: NAME-train, NAME-refresh
#   MAX_RESTARTS     50                     restarts of the trainer workload
#   PRIORITY         medium                 xpk priority of both workloads
#   DRY_RUN          (unset)                1: print the commands instead of running them
set -euo pipefail

CLUSTER=${CLUSTER:-realm-jax}
ZONE=${ZONE:-us-west4-a}
PROJECT=${PROJECT:-}
TPU_TYPE=${TPU_TYPE:-v5litepod-16}
NUM_SLICES=${NUM_SLICES:-1}
REFRESH_TPU_TYPE=${REFRESH_TPU_TYPE:-v5litepod-8}
BASE_IMAGE=${BASE_IMAGE:-python:3.11}
DOCKER_IMAGE=${DOCKER_IMAGE:-}
STORAGE=${STORAGE:-}
NAME=${NAME:-realm-jax}
MAX_RESTARTS=${MAX_RESTARTS:-50}
PRIORITY=${PRIORITY:-medium}
DRY_RUN=${DRY_RUN:-}

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh" "$@"
shift "$lib_shift"
where=("--cluster=$CLUSTER" "${where[@]}")
[ $# -ge 1 ] || usage
command=$1
shift

# One xpk workload running `realm-jax SUB --config CONFIG --workdir WORKDIR [overrides]`.
submit() {
  local sub=$1 line run
  line=$(realm_jax_line "$@")
  local args=(--workload="$NAME-$sub" --priority="$PRIORITY")
  if [ -n "$DOCKER_IMAGE" ]; then
    args+=(--docker-image="$DOCKER_IMAGE")
    run="realm-jax $line"
  else
    args+=(--base-docker-image="$BASE_IMAGE" --script-dir=.)
    run="pip install -q -e . 'jax[tpu]' && realm-jax $line"
  fi
  if [ "$sub" = train ]; then
    args+=(--tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" --max-restarts="$MAX_RESTARTS")
  else
    args+=(--tpu-type="$REFRESH_TPU_TYPE" --num-slices=1)
  fi
  if [ -n "$STORAGE" ]; then
    args+=(--storage="$STORAGE")
  fi
  x xpk workload create "${where[@]}" "${args[@]}" --command="$run"
}

case $command in
  train|refresh)
    submit "$command" "$@"
    ;;
  list)
    x xpk workload list "${where[@]}" --filter-by-job="$NAME"
    ;;
  wait)
    x xpk workload list "${where[@]}" --wait-for-job-completion="$NAME-${1:-train}"
    ;;
  delete)
    if [ $# -eq 0 ]; then
      set -- train refresh
    fi
    for sub in "$@"; do
      x xpk workload delete "${where[@]}" --workload="$NAME-$sub"
    done
    ;;
  *)
    usage
    ;;
esac
