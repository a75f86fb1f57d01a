# Shell helpers shared by scripts/ and bench/: `source scripts/lib.sh`.

# free_port: prints a TCP port that is free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# eventually WHAT CMD...: runs CMD every 0.2 s for up to EVENTUALLY_SECONDS (10) until it
# succeeds; else says what was expected (and prints $log, if set) and fails.
eventually() {
  local what="$1"; shift
  local tries=$(( ${EVENTUALLY_SECONDS:-10} * 5 ))
  for _ in $(seq 1 "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$(basename "$0"): expected $what" >&2
  [ -n "${log:-}" ] && cat "$log" >&2
  return 1
}

# stop_on_exit PID...: the processes get SIGTERM (and SIGKILL 5 s later if still there) when the
# script exits, however it exits, so a failed check leaves nothing running.
_stop_pids=()
stop_on_exit() {
  _stop_pids+=("$@")
  trap _stop_all EXIT
}
_stop_all() {
  local rc=$? p
  for p in "${_stop_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 25); do
    local alive=0
    for p in "${_stop_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for p in "${_stop_pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  return "$rc"
}
