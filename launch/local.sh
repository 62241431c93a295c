#!/usr/bin/env bash
# REALM on one machine: the refresher and the trainer as two processes over one workdir.
#
#   launch/local.sh CONFIG WORKDIR [--config.field=value ...]
#
# The refresher re-embeds the corpus from the trainer's checkpoints and publishes index
# snapshots under WORKDIR/index; the trainer swaps them in at step boundaries. Ctrl-C stops
# both; when training ends (the trainer writes its FINISHED marker) the refresher does a last
# refresh and exits. Logs: WORKDIR/refresher.log, and the trainer on this terminal.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
realm_jax=${REALM_JAX:-realm-jax}
mkdir -p "$workdir"

"$realm_jax" refresh --config "$config" --workdir "$workdir" "$@" >"$workdir/refresher.log" 2>&1 &
refresher=$!
stop() {
  kill -TERM "$refresher" 2>/dev/null || true
  wait "$refresher" 2>/dev/null || true
}
trap 'echo "stopping"; stop; exit 130' INT TERM
trap stop EXIT

"$realm_jax" train --config "$config" --workdir "$workdir" "$@"
# Training finished: give the refresher its final pass, then stop it.
wait "$refresher" || true
