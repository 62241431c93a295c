# shellcheck shell=bash
# Sourced by the launch scripts: `usage` prints the calling script's header comment (its
# lines up to `set -euo ...`) and exits 2; `x` runs a command line or, with DRY_RUN set,
# prints it instead.

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
