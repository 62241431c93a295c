# shellcheck shell=bash
# Sourced by the launch scripts: `usage` prints the calling script's header comment (its
# lines up to `set -euo ...`) and exits 2; `x` runs a command line or, with DRY_RUN set,
# prints it instead; `realm_jax_line` quotes one realm-jax command line; sourcing it after
# the script's knobs sets `where` (the location flags gcloud and xpk share: ZONE and
# PROJECT when set) and consumes a leading --dry_run of the script's arguments by setting
# DRY_RUN=1 (`source lib.sh "$@"; shift "$lib_shift"`).

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

x() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# SUBCOMMAND CONFIG WORKDIR [overrides] -> the quoted arguments of `realm-jax`.
realm_jax_line() {
  [ $# -ge 3 ] || usage
  local sub=$1 config=$2 workdir=$3 line
  shift 3
  line=$(printf '%q ' "$sub" --config "$config" --workdir "$workdir" "$@")
  printf '%s' "${line% }"
}

where=("--zone=$ZONE")
if [ -n "${PROJECT:-}" ]; then
  where+=("--project=$PROJECT")
fi

# lib_shift and DRY_RUN are read by the sourcing script.
# shellcheck disable=SC2034
{
  lib_shift=0
  if [ "${1:-}" = "--dry_run" ]; then
    DRY_RUN=1
    lib_shift=1
  fi
}
