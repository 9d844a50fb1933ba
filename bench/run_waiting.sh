#!/usr/bin/env bash
# Parked runs at scale: N runs of `approve` (wait_for_signal {name: go} -> transform)
# submitted to `keel serve` through POST /v1/runs, left waiting, then all signalled.
# Measures what N waiting runs cost in memory (a waiting run holds no worker and no
# thread, so the figure should be a database's worth, not a thread's) and how fast the
# signals bring them to `succeeded`. SQLite with durable commits (WAL, synchronous=FULL).
# A benchmark, not a test: it prints a table; it exits non-zero only when the run itself
# is invalid (a lost or failed run, refused submits or signals, a process that died, a
# phase that never finished).
#
#   bench/run_waiting.sh                      # N=10000, once
#   REPEAT=3 bench/run_waiting.sh             # three fresh servers; the table of medians
#
# Builds nothing, installs nothing: needs $KEEL (default build-bench/keel), wrk (with its
# LuaJIT) and curl. The wrk scripts are bench/waiting_submit.lua and waiting_signal.lua.
#
# Parameters (environment):
#   KEEL         keel binary                                   default: <repo>/build-bench/keel
#   N            runs submitted, then signalled                default: 10000
#   REPEAT       repetitions, each on a fresh server and database; >1 also prints medians
#                                                              default: 1
#   CONNECTIONS  wrk connections, for the submits and the signals  default: 64
#   THREADS      wrk threads                                   default: 1
#   WORKERS      engine.workers of keel serve                  default: 64
#   LISTEN       keel's listen address (port 0: ephemeral)     default: 127.0.0.1:0
#   LOG_LEVEL    keel's log_level                              default: info
#   IDLE_WAIT    seconds between "listening" and the idle RSS reading   default: 2
#   SETTLE       seconds between "all waiting" and the RSS reading      default: 1
#   TIMEOUT      seconds each phase (submit, all waiting, all succeeded) may take  default: 300
#   KEEP_TMP=1   keep the temp dir (config, logs, databases, wrk output) for inspection
#
# Figures (per repetition; with REPEAT>1 the medians follow):
#   submit rate           runs created (201) / time from the first submit sent to the
#                         last answer received (timed by the wrk scripts, per thread)
#   all waiting after     from the first submit until /metrics says N runs are `waiting`
#   idle RSS              VmRSS of keel serve IDLE_WAIT s after start-up
#   RSS, N waiting        VmRSS SETTLE s after all N are waiting (and its rise over idle;
#                         target: < 100 MiB for N=10000)
#   signal send rate      signals answered 202 / time from the first signal sent to the
#                         last answer received
#   signal -> completion  N / (first /metrics reading with N `succeeded` - first signal)
#                         (target: >= 1000 runs/s); /metrics is read every 50 ms
#   keel CPU per run      utime+stime of keel serve from the first signal to the last
#                         completion, per run
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
KEEL=${KEEL:-$root/build-bench/keel}
N=${N:-10000}
REPEAT=${REPEAT:-1}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WORKERS=${WORKERS:-64}
LISTEN=${LISTEN:-127.0.0.1:0}
LOG_LEVEL=${LOG_LEVEL:-info}
IDLE_WAIT=${IDLE_WAIT:-2}
SETTLE=${SETTLE:-1}
TIMEOUT=${TIMEOUT:-300}
KEEP_TMP=${KEEP_TMP:-0}

die() { echo "run_waiting: $*" >&2; exit 1; }
[[ $KEEL == /* ]] || KEEL=$PWD/$KEEL
[[ -x $KEEL ]] || die "no keel binary at $KEEL (build it, or set KEEL)"
command -v wrk >/dev/null || die "wrk not found"
command -v curl >/dev/null || die "curl not found"
((N >= 1 && REPEAT >= 1)) || die "N and REPEAT must be >= 1"

source "$here/lib.sh"
bench_init waiting

# runs_by_status: "queued running waiting succeeded bad" from keel's /metrics (bad: failed
# + cancelled + dead_lettered).
runs_by_status() {
  local m
  m=$(curl -sf --max-time 10 "http://$keel_addr/metrics") || return 0
  awk <<<"$m" '
    {k = $1; sub(/\{.*/, "", k)}
    k == "keel_runs" {
      if (index($1, "status=\"queued\"")) q += $NF
      else if (index($1, "status=\"running\"")) r += $NF
      else if (index($1, "status=\"waiting\"")) w += $NF
      else if (index($1, "status=\"succeeded\"")) s += $NF
      else b += $NF
    }
    END {printf "%d %d %d %d %d\n", q, r, w, s, b}'
}

# wait_for STATUS-INDEX TARGET DEADLINE-MS: polls /metrics every 50 ms until the count at
# STATUS-INDEX (1 queued .. 4 succeeded) reaches TARGET; prints the time (ms) of that
# reading. Dies on a bad run, a dead keel, or the deadline.
wait_for() {
  local idx=$1 target=$2 deadline=$3 counts
  while :; do
    counts=($(runs_by_status))
    ((${#counts[@]} == 5)) || die "GET /metrics failed"
    local t
    t=$(now_ms)
    ((counts[4] == 0)) || die "${counts[4]} runs ended failed/cancelled/dead_lettered"
    if ((counts[idx - 1] >= target)); then echo "$t"; return 0; fi
    kill -0 "$keel_pid" 2>/dev/null || die "keel serve died"
    ((t < deadline)) || die "timed out: runs by status (queued running waiting succeeded bad): ${counts[*]}, want $target"
    sleep 0.05
  done
}

# run_wrk OUT MARKER WRK-ARGS...: runs wrk with one of the bench/waiting_*.lua scripts,
# which write $WAITING_OUT/MARKER.TID when thread TID is done; wrk 4.1 runs until its -d
# whatever its threads do, so it gets SIGINT once THREADS markers exist. Dies when wrk
# fails or TIMEOUT passes. Runs in the foreground or in a subshell (&).
run_wrk() {
  local out=$1 marker=$2 wrk_pid deadline
  shift 2
  rm -f "$WAITING_OUT/$marker".*
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$((TIMEOUT + 60))s" --timeout 30s --latency "$@" >"$out" 2>&1 &
  wrk_pid=$!
  pids+=("$wrk_pid")
  deadline=$(($(now_ms) + TIMEOUT * 1000))
  while (($(find "$WAITING_OUT" -maxdepth 1 -name "$marker.*" | wc -l) < THREADS)); do
    kill -0 "$wrk_pid" 2>/dev/null || { cat "$out" >&2; die "wrk exited early"; }
    (($(now_ms) < deadline)) || { kill -INT "$wrk_pid"; wait "$wrk_pid" || true; cat "$out" >&2; die "wrk did not finish in ${TIMEOUT}s"; }
    sleep 0.01
  done
  kill -INT "$wrk_pid"
  wait "$wrk_pid" || { cat "$out" >&2; die "wrk failed"; }
  grep -q '^WRK_RESULT' "$out" || { cat "$out" >&2; die "no WRK_RESULT line in $out"; }
}

# wrkv FILE KEY: the value of KEY=... on the WRK_RESULT line of FILE.
wrkv() { sed -n "s/^WRK_RESULT.* $2=\([0-9]*\).*/\1/p" "$1"; }

results=()  # one "key=value ..." line per repetition

one_rep() {
  local rep=$1 dir="$tmp/rep$1"
  mkdir -p "$dir"
  cat >"$dir/keel.yaml" <<EOF
listen: $LISTEN
storage: sqlite://$dir/data/keel.db
log_level: $LOG_LEVEL
engine: {workers: $WORKERS}
pipelines:
  approve:
    description: "Benchmark: wait for a signal, then transform"
    steps:
      - id: wait
        wait_for_signal: {name: go}
      - id: result
        transform: {n: "{{input.n}}", decision: "{{steps.wait.output.decision}}"}
EOF
  "$KEEL" serve --config "$dir/keel.yaml" 2>"$dir/keel.log" &
  keel_pid=$!
  pids+=("$keel_pid")
  keel_addr=$(wait_listening "$dir/keel.log" "$keel_pid")
  sleep "$IDLE_WAIT"
  local idle_rss load_avg
  idle_rss=$(rss_kb "$keel_pid")
  load_avg=$(cut -d' ' -f1-3 /proc/loadavg)

  # --- submit N ------------------------------------------------------------------------
  local t0 t_waiting
  t0=$(now_ms)
  WAITING_OUT="$dir" run_wrk "$dir/wrk_submit.out" done -s "$here/waiting_submit.lua" "http://$keel_addr" -- "$N" "$THREADS"
  local created refused s_first s_last s_err s_p50 s_p99
  created=$(wrkv "$dir/wrk_submit.out" created); refused=$(wrkv "$dir/wrk_submit.out" refused)
  s_first=$(wrkv "$dir/wrk_submit.out" first_us); s_last=$(wrkv "$dir/wrk_submit.out" last_us)
  s_err=$(wrkv "$dir/wrk_submit.out" errors)
  s_p50=$(wrkv "$dir/wrk_submit.out" p50_us); s_p99=$(wrkv "$dir/wrk_submit.out" p99_us)
  ((created == N && refused == 0 && s_err == 0)) ||
    die "submits: $created created, $refused refused, $s_err socket errors (want $N created)"
  cat "$dir"/ids.* >"$dir/ids"
  (($(grep -c '^run_' "$dir/ids") == N)) || die "the ids files hold $(grep -c '^run_' "$dir/ids") ids, not $N"

  t_waiting=$(wait_for 3 "$N" $((t0 + TIMEOUT * 1000)))
  sleep "$SETTLE"
  local waiting_rss waiting_hwm db_size
  waiting_rss=$(rss_kb "$keel_pid")
  waiting_hwm=$(hwm_kb "$keel_pid")
  db_size=$(du -sk "$dir/data" | cut -f1)

  # --- signal N --------------------------------------------------------------------------
  local t2 t3 cpu0 cpu1
  cpu0=$(cpu_ms "$keel_pid")
  t2=$(now_ms)
  # In the background: completions are counted while the signals still go out.
  WAITING_OUT="$dir" WAITING_IDS="$dir/ids" run_wrk "$dir/wrk_signal.out" signalled \
    -s "$here/waiting_signal.lua" "http://$keel_addr" -- "$THREADS" &
  local signaller=$!
  t3=$(wait_for 4 "$N" $((t2 + TIMEOUT * 1000)))
  cpu1=$(cpu_ms "$keel_pid")
  wait "$signaller" || die "the signals failed"
  local accepted g_refused g_first g_last g_err g_p50 g_p99
  accepted=$(wrkv "$dir/wrk_signal.out" accepted); g_refused=$(wrkv "$dir/wrk_signal.out" refused)
  g_first=$(wrkv "$dir/wrk_signal.out" first_us); g_last=$(wrkv "$dir/wrk_signal.out" last_us)
  g_err=$(wrkv "$dir/wrk_signal.out" errors)
  g_p50=$(wrkv "$dir/wrk_signal.out" p50_us); g_p99=$(wrkv "$dir/wrk_signal.out" p99_us)
  ((accepted == N && g_refused == 0 && g_err == 0)) ||
    die "signals: $accepted accepted, $g_refused refused, $g_err socket errors (want $N accepted)"
  local done_rss
  done_rss=$(rss_kb "$keel_pid")

  stop_all
  [[ $KEEP_TMP == 1 ]] || rm -rf "$dir/data"

  local line
  line="rep=$rep load=${load_avg// /,} idle_rss_mib=$(calc %.1f "$idle_rss / 1024")"
  line+=" waiting_rss_mib=$(calc %.1f "$waiting_rss / 1024") rise_mib=$(calc %.1f "($waiting_rss - $idle_rss) / 1024")"
  line+=" waiting_hwm_mib=$(calc %.1f "$waiting_hwm / 1024") done_rss_mib=$(calc %.1f "$done_rss / 1024")"
  line+=" submit_rps=$(calc %.0f "$created / (($s_last - $s_first) / 1e6)") submit_p50_ms=$(calc %.2f "$s_p50 / 1000")"
  line+=" submit_p99_ms=$(calc %.2f "$s_p99 / 1000") all_waiting_s=$(calc %.2f "($t_waiting - $t0) / 1000")"
  line+=" signal_rps=$(calc %.0f "$accepted / (($g_last - $g_first) / 1e6)") signal_p50_ms=$(calc %.2f "$g_p50 / 1000")"
  line+=" signal_p99_ms=$(calc %.2f "$g_p99 / 1000") completion_s=$(calc %.2f "($t3 - $t2) / 1000")"
  line+=" completion_rps=$(calc %.0f "$N / (($t3 - $t2) / 1000)") cpu_us_per_run=$(calc %.0f "($cpu1 - $cpu0) * 1000 / $N")"
  line+=" db_mib=$(calc %.1f "$db_size / 1024")"
  echo "RESULT $line"
  results+=("$line")
}

# val LINE KEY: the value of KEY=... in LINE.
val() { sed -n "s/.*\\b$2=\\([^ ]*\\).*/\\1/p" <<<"$1"; }
# median KEY: the median over the repetitions (the mean of the middle two for an even count).
median() {
  local key=$1
  for l in "${results[@]}"; do val "$l" "$key"; done | sort -g |
    awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

for rep in $(seq "$REPEAT"); do one_rep "$rep"; done

row() { printf '  %-36s %s\n' "$1" "$2"; }
what="values"
((REPEAT > 1)) && what="medians of $REPEAT repetitions"
pick() { if ((REPEAT > 1)); then median "$1"; else val "${results[0]}" "$1"; fi; }
echo
echo "keel parked runs: $N x approve (wait_for_signal -> transform), sqlite synchronous=FULL — $what"
row "host" "$(nproc) cores; loadavg at start of each rep: $(for l in "${results[@]}"; do printf '%s ' "$(val "$l" load)"; done)"
row "config" "workers=$WORKERS connections=$CONNECTIONS wrk_threads=$THREADS log_level=$LOG_LEVEL"
echo "  ------------------------------------------------------------------------"
row "idle RSS" "$(pick idle_rss_mib) MiB"
row "RSS with $N waiting" "$(pick waiting_rss_mib) MiB  (+$(pick rise_mib) MiB over idle; peak $(pick waiting_hwm_mib) MiB)"
row "RSS after all succeeded" "$(pick done_rss_mib) MiB"
row "database with $N waiting" "$(pick db_mib) MiB"
row "submit rate" "$(pick submit_rps) runs/s  (p50 $(pick submit_p50_ms) ms, p99 $(pick submit_p99_ms) ms)"
row "first submit -> all $N waiting" "$(pick all_waiting_s) s"
row "signal send rate" "$(pick signal_rps) signals/s  (p50 $(pick signal_p50_ms) ms, p99 $(pick signal_p99_ms) ms)"
row "signal -> completion" "$(pick completion_rps) runs/s  ($N runs in $(pick completion_s) s)"
row "keel CPU per signalled run" "$(pick cpu_us_per_run) us"
echo "  ------------------------------------------------------------------------"
if ((REPEAT > 1)); then
  echo "  per repetition:"
  for l in "${results[@]}"; do
    printf '    rep %s: submit %s/s, rss +%s MiB, completion %s/s (%s s)\n' "$(val "$l" rep)" "$(val "$l" submit_rps)" \
      "$(val "$l" rise_mib)" "$(val "$l" completion_rps)" "$(val "$l" completion_s)"
  done
fi
exit 0
