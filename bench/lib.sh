# Shared by the bench/ scripts: a temporary directory, the processes a script starts
# (stopped on exit: TERM, a bounded wait, then KILL), and small measuring helpers.
# Usage, after defining die():  source "$here/lib.sh"; bench_init NAME
# Then append each started process's pid to `pids`. Commands appended to `exit_hooks`
# (strings, eval'ed) run on exit after those processes stopped, e.g. to stop a database.

bench_init() {
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-bench-$1.XXXXXX")
  pids=()
  exit_hooks=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

# stop_pids PID...: stops those processes (TERM, up to 5 s, then KILL) and reaps them.
stop_pids() {
  (($#)) || return 0
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}

# forget_pids PID...: removes those pids from `pids` (once stop_pids stopped them).
forget_pids() {
  local keep=() pid gone g
  for pid in "${pids[@]}"; do
    gone=0
    for g in "$@"; do [[ $pid == "$g" ]] && gone=1; done
    ((gone)) || keep+=("$pid")
  done
  pids=("${keep[@]}")
}

# Stops every process in `pids` and forgets them.
stop_all() {
  ((${#pids[@]})) || return 0
  stop_pids "${pids[@]}"
  pids=()
}

bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  local hook
  for hook in "${exit_hooks[@]}"; do eval "$hook" || true; done
  wait 2>/dev/null || true
  if [[ ${KEEP_TMP:-0} == 1 ]]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
  exit "$rc"
}

now_ms() { date +%s%3N; }
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$1/stat"; }
rss_kb() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '$1 == "VmHWM:" {print $2}' "/proc/$1/status"; }
calc() { awk "BEGIN {printf \"$1\", $2}"; }

# wait_listening LOG PID: prints HOST:PORT from keel's {"msg":"listening","addr":...} line.
wait_listening() {
  local log=$1 pid=$2 addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*"msg":"listening","addr":"\([^"]*\)".*/\1/p' "$log" | head -1)
    [[ -n $addr ]] && { echo "$addr"; return 0; }
    kill -0 "$pid" 2>/dev/null || { tail -20 "$log" >&2; die "process $pid exited during start-up"; }
    sleep 0.1
  done
  tail -20 "$log" >&2
  die "no listening line in $log after 10s"
}
