# Helpers the resumable benchmark scripts share; source after setting `started=$(date +%s)`.

# A line on stderr with the seconds since the script started.
log() { echo "[$(( $(date +%s) - started ))s] $*" >&2; }

# Run "$@" unless its output file (the argument after --out) exists already, so an interrupted
# benchmark resumes where it stopped.
once() {
  local out="" prev=""
  for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
  [ -n "$out" ] && [ -e "$out" ] && return 0
  log "$*"; "$@" > /dev/null
}
