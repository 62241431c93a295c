#!/usr/bin/env bash
# realm-jax on a Cloud TPU VM slice: every host runs the same command and JAX's own
# runtime (jax.distributed, detected on TPU VMs) joins them into one job.
#
#   launch/tpu_vm.sh [--dry_run] create            # the TPU VM (all its hosts)
#   launch/tpu_vm.sh [--dry_run] copy              # this checkout to every host, installed
#   launch/tpu_vm.sh [--dry_run] train CONFIG WORKDIR [--config.field=value ...]
#   launch/tpu_vm.sh [--dry_run] refresh CONFIG WORKDIR [--config.field=value ...]
#   launch/tpu_vm.sh [--dry_run] run COMMAND...    # any command, on every host
#   launch/tpu_vm.sh [--dry_run] logs [train|refresh]   # follow host WORKER's log
#   launch/tpu_vm.sh [--dry_run] stop              # interrupt train/refresh on every host
#   launch/tpu_vm.sh [--dry_run] delete            # the TPU VM
#
# train/refresh start detached on all hosts (logs: ~/realm-jax-train.log,
# ~/realm-jax-refresh.log on each). Run the refresher on its own slice (another TPU_NAME)
# over the same WORKDIR: the two share nothing else. WORKDIR must be a folder every host
# of both slices sees: a bucket mounted with MOUNT_BUCKET (gcsfuse, at /mnt/BUCKET) or NFS.
#
# Knobs (environment):
#   TPU_NAME         realm-jax              the TPU VM
#   ZONE             us-west4-a             its zone
#   ACCELERATOR_TYPE v5litepod-16           slice type and size (v5litepod-16: 16 chips, 4 hosts)
#   RUNTIME_VERSION  v2-alpha-tpuv5-lite    TPU VM image for that accelerator
#   PROJECT          (gcloud's default)     Google Cloud project
#   MOUNT_BUCKET     (none)                 a gs bucket name mounted at /mnt/NAME on copy
#   REMOTE_DIR       realm-jax              the checkout's folder on each host
#   WORKER           0                      the host whose log `logs` follows
#   DRY_RUN          (unset)                1: print the commands instead of running them
set -euo pipefail

TPU_NAME=${TPU_NAME:-realm-jax}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
PROJECT=${PROJECT:-}
MOUNT_BUCKET=${MOUNT_BUCKET:-}
REMOTE_DIR=${REMOTE_DIR:-realm-jax}
WORKER=${WORKER:-0}
DRY_RUN=${DRY_RUN:-}

# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh" "$@"
shift "$lib_shift"
[ $# -ge 1 ] || usage
command=$1
shift

tpu=(gcloud compute tpus tpu-vm)
# The same shell command on every host of the slice.
on_all() {
  x "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

# realm-jax SUBCOMMAND CONFIG WORKDIR [overrides], detached on every host.
start() {
  local sub=$1 line
  line=$(realm_jax_line "$@")
  on_all "cd $REMOTE_DIR && { nohup .venv/bin/realm-jax $line > ~/realm-jax-$sub.log 2>&1 \
< /dev/null & echo \$! > ~/realm-jax-$sub.pid; }"
}

case $command in
  create)
    x "${tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION"
    ;;
  copy)
    # The tracked files of this checkout (committed or not), then a venv on every host.
    archive=${TMPDIR:-/tmp}/realm-jax-$$.tar.gz
    x bash -c "git ls-files -z | tar --null -czf $(printf '%q' "$archive") -T -"
    x "${tpu[@]}" scp "$archive" "$TPU_NAME:realm-jax.tar.gz" "${where[@]}" --worker=all
    x rm -f "$archive"
    on_all "mkdir -p $REMOTE_DIR && tar -xzf realm-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR \
&& python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -e . 'jax[tpu]'"
    if [ -n "$MOUNT_BUCKET" ]; then
      on_all "(command -v gcsfuse > /dev/null || (export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) \
&& echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list \
&& curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - \
&& sudo apt-get update -q && sudo apt-get install -qy gcsfuse)) \
&& sudo mkdir -p /mnt/$MOUNT_BUCKET && sudo chown \$USER /mnt/$MOUNT_BUCKET \
&& (mountpoint -q /mnt/$MOUNT_BUCKET || gcsfuse --implicit-dirs $MOUNT_BUCKET /mnt/$MOUNT_BUCKET)"
    fi
    ;;
  train | refresh)
    start "$command" "$@"
    ;;
  run)
    [ $# -ge 1 ] || usage
    on_all "cd $REMOTE_DIR && . .venv/bin/activate && $(printf '%q ' "$@")"
    ;;
  logs)
    x "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker="$WORKER" \
      --command="tail -n 100 -F ~/realm-jax-${1:-train}.log"
    ;;
  stop)
    # SIGINT to what train/refresh started on each host (a checkpointed run resumes).
    on_all "for f in ~/realm-jax-*.pid; do [ -f \$f ] && kill -INT \$(cat \$f) 2> /dev/null; \
rm -f \$f; done; true"
    ;;
  delete)
    x "${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
