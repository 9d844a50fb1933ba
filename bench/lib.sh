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

# bench3_yaml: the provider (the mock at $mock_addr), route and 3-step pipeline "bench3"
# (llm -> llm -> transform) of the throughput benchmarks, as keel.yaml lines.
bench3_yaml() {
  cat <<EOF
providers:
  mock: {type: openai, base_url: "http://$mock_addr/v1", model: mock-1}
routes:
  default: {strategy: priority, targets: [{provider: mock}]}
pipelines:
  bench3:
    description: "Benchmark: llm -> llm -> transform"
    steps:
      - id: draft
        llm:
          route: default
          messages:
            - {role: system, content: "You write terse answers."}
            - {role: user, content: "Answer ticket {{input.n}} from {{input.customer}}:\n{{input.ticket}}"}
      - id: refine
        llm:
          route: default
          messages:
            - {role: user, content: "Improve this answer to ticket {{input.n}} (client {{input.worker}}):\n{{steps.draft.text}}"}
      - id: result
        transform: {n: "{{input.n}}", answer: "{{steps.refine.text}}", model: "{{steps.refine.model}}"}
EOF
}

# Reading keel's /metrics (saved to a file).
# msum FILE NAME [LABEL-SUBSTRING]: sum of the samples of metric NAME (optionally only the
# series whose label set contains LABEL-SUBSTRING); 0 when absent.
msum() {
  awk -v n="$2" -v l="${3:-}" '{k = $1; sub(/\{.*/, "", k)} k == n && index($1, l) {s += $NF}
                               END {printf "%.0f\n", s + 0}' "$1"
}
# other_codes FILE: submit answers other than 201 and 429, from keel's own request counter.
other_codes() {
  awk '{k = $1; sub(/\{.*/, "", k)} k == "keel_http_requests_total" && index($1, "handler=\"submit_run\"") &&
       !index($1, "code=\"201\"") && !index($1, "code=\"429\"") {s += $NF} END {printf "%.0f\n", s + 0}' "$1"
}
terminal_bad() {  # runs that ended in a terminal state other than succeeded
  echo $(( $(msum "$1" keel_runs 'status="failed"') + $(msum "$1" keel_runs 'status="dead_lettered"') +
           $(msum "$1" keel_runs 'status="cancelled"') ))
}
