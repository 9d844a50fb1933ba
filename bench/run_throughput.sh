#!/usr/bin/env bash
# End-to-end throughput of `keel serve`: a 3-step pipeline (llm -> llm -> transform)
# against `keel mock-llm` (zero latency), submitted through POST /v1/runs by wrk, with
# durable SQLite commits (WAL, synchronous=FULL). A benchmark, not a test: it prints a
# table; it exits non-zero only when the run itself is invalid (a failed or lost run,
# non-2xx answers, a drain that never finished, a process that died).
#
#   bench/run_throughput.sh                       # defaults below
#   WORKERS=64 DURATION=20s bench/run_throughput.sh
#
# Builds nothing, installs nothing: needs $KEEL (default build-bench/keel), wrk and curl.
#
# Parameters (environment):
#   KEEL           keel binary                       default: <repo>/build-bench/keel
#   DURATION       wrk load duration (wrk syntax)    default: 10s
#   CONNECTIONS    wrk connections (concurrency)     default: 64
#   THREADS        wrk threads                       default: 1
#   WORKERS        engine.workers of keel serve      default: 64
#   DRAIN_TIMEOUT  seconds to wait, after the load, for every submitted run to end  default: 300
#   IDLE_WAIT      seconds between "listening" and the idle RSS reading             default: 2
#   MAX_QUEUE_DEPTH  engine.max_queue_depth (unset: keel's default, 100000). A closed-loop
#                  flood outruns the workers, so long DURATIONs reach it: the excess submits
#                  are answered 429 and reported as "rejected", which is not an error.
#   KEEP_TMP=1     keep the temp dir (config, logs, database, wrk output) for inspection
#   PERF_HOOK      optional command run in the background during the load with
#                  KEEL_PID set, e.g. 'perf record -g -p $KEEL_PID -o /tmp/p.data -- sleep 8'
#
# Figures:
#   submitted runs        runs accepted (201) during the load (keel_runs_submitted_total)
#   rejected (429)        submits refused because the queue was full (backpressure)
#   submit rate           wrk requests / wrk duration
#   submit p50/p99        wrk latency percentiles of POST /v1/runs (closed loop, -c CONNECTIONS)
#   sustained completion  runs that succeeded during the load window / load duration
#   end-to-end completion runs succeeded / (time of the last completion - start of the load)
#   step checkpoints/s    3 x end-to-end completion (each run commits 3 step checkpoints)
#   failed/dead-lettered  runs that ended failed, dead_lettered or cancelled (must be 0)
#   idle RSS              VmRSS of keel serve IDLE_WAIT s after start-up, before any request
#   RSS after load        VmRSS (and peak VmHWM) once every run has ended
#   CPU per run           utime+stime of keel serve (and of the mock) from start of load to
#                         the last completion, divided by the runs completed
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
KEEL=${KEEL:-$root/build-bench/keel}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WORKERS=${WORKERS:-64}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}
IDLE_WAIT=${IDLE_WAIT:-2}
MAX_QUEUE_DEPTH=${MAX_QUEUE_DEPTH:-}
KEEP_TMP=${KEEP_TMP:-0}
PERF_HOOK=${PERF_HOOK:-}

die() { echo "run_throughput: $*" >&2; exit 1; }
[[ -x $KEEL ]] || die "no keel binary at $KEEL (build it, or set KEEL)"
command -v wrk >/dev/null || die "wrk not found"
command -v curl >/dev/null || die "curl not found"

source "$here/lib.sh"
bench_init runs

# CPU time (user + system) of a process in ms.

# scrape FILE: fetches keel's /metrics into FILE.
scrape() { curl -sf --max-time 10 "http://$keel_addr/metrics" -o "$1" || die "GET /metrics failed"; }

# --- start the mock and keel -------------------------------------------------------------
cd "$tmp"
"$KEEL" mock-llm --listen 127.0.0.1:0 2>"$tmp/mock.log" &
mock_pid=$!
pids+=("$mock_pid")
mock_addr=$(wait_listening "$tmp/mock.log" "$mock_pid")

{
  cat <<EOF
listen: 127.0.0.1:0
storage: sqlite://$tmp/data/keel.db
engine: {workers: $WORKERS${MAX_QUEUE_DEPTH:+, max_queue_depth: $MAX_QUEUE_DEPTH}}
EOF
  bench3_yaml
} >"$tmp/keel.yaml"

"$KEEL" serve --config "$tmp/keel.yaml" --listen 127.0.0.1:0 2>"$tmp/keel.log" &
keel_pid=$!
pids+=("$keel_pid")
keel_addr=$(wait_listening "$tmp/keel.log" "$keel_pid")

sleep "$IDLE_WAIT"
idle_rss=$(rss_kb "$keel_pid")

# --- smoke: one run end to end, so that a broken setup fails fast, not after the load ----
code=$(curl -s -o "$tmp/smoke.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"pipeline":"bench3","input":{"n":0,"worker":0,"customer":"smoke","ticket":"smoke test"}}' \
  "http://$keel_addr/v1/runs")
[[ $code == 201 ]] || { cat "$tmp/smoke.json" >&2; die "smoke submit answered $code"; }
for _ in $(seq 100); do
  scrape "$tmp/m0"
  [[ $(msum "$tmp/m0" keel_runs 'status="succeeded"') -ge 1 ]] && break
  [[ $(terminal_bad "$tmp/m0") -gt 0 ]] && { tail -5 "$tmp/keel.log" >&2; die "the smoke run did not succeed"; }
  sleep 0.1
done
[[ $(msum "$tmp/m0" keel_runs 'status="succeeded"') -ge 1 ]] || die "the smoke run did not finish in 10s"

# --- load -----------------------------------------------------------------------------------
scrape "$tmp/m0"
sub0=$(msum "$tmp/m0" keel_runs_submitted_total)
ok0=$(msum "$tmp/m0" keel_runs 'status="succeeded"')
bad0=$(terminal_bad "$tmp/m0")
errs0=$(msum "$tmp/m0" keel_step_errors_total)
rej0=$(msum "$tmp/m0" keel_http_requests_total 'code="429"')
other0=$(other_codes "$tmp/m0")
keel_cpu0=$(cpu_ms "$keel_pid")
mock_cpu0=$(cpu_ms "$mock_pid")
load_avg=$(cut -d' ' -f1-3 /proc/loadavg)

if [[ -n $PERF_HOOK ]]; then
  KEEL_PID=$keel_pid bash -c "$PERF_HOOK" >"$tmp/perf_hook.log" 2>&1 &
  perf_hook_pid=$!
fi

t0=$(now_ms)
# In the background and waited for, so that a signal to this script runs the trap at once.
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$here/submit_run.lua" \
  "http://$keel_addr" >"$tmp/wrk.out" 2>&1 &
wrk_pid=$!
pids+=("$wrk_pid")
wait "$wrk_pid" || { cat "$tmp/wrk.out" >&2; die "wrk failed"; }
t1=$(now_ms)
scrape "$tmp/m1"
ok1=$(msum "$tmp/m1" keel_runs 'status="succeeded"')

wrk_line=$(grep '^WRK_RESULT' "$tmp/wrk.out") || { cat "$tmp/wrk.out" >&2; die "no WRK_RESULT line"; }
wrkv() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<" ${wrk_line#WRK_RESULT}"; }
w_requests=$(wrkv requests); w_duration=$(wrkv duration_us); w_non2xx=$(wrkv non2xx)
w_errors=$(wrkv errors); w_p50=$(wrkv p50_us); w_p90=$(wrkv p90_us); w_p99=$(wrkv p99_us)
w_p999=$(wrkv p999_us); w_max=$(wrkv max_us)

# --- drain: wait (bounded) until every submitted run has ended ----------------------------
deadline=$(( $(now_ms) + DRAIN_TIMEOUT * 1000 ))
t_last=$t1
prev_ok=-1
drained=0
while :; do
  scrape "$tmp/m2"
  t_now=$(now_ms)
  sub=$(( $(msum "$tmp/m2" keel_runs_submitted_total) - sub0 ))
  ok=$(( $(msum "$tmp/m2" keel_runs 'status="succeeded"') - ok0 ))
  bad=$(( $(terminal_bad "$tmp/m2") - bad0 ))
  ((ok != prev_ok)) && t_last=$t_now
  prev_ok=$ok
  if ((ok + bad >= sub)); then drained=1; break; fi
  kill -0 "$keel_pid" 2>/dev/null || die "keel serve died during the drain"
  ((t_now < deadline)) || break
  # Each /metrics call counts every run in the database (GetStats), so poll slowly while
  # the backlog is large and every 0.1 s near the end, where the timing matters.
  if ((sub - ok - bad > 2000)); then sleep 0.5; else sleep 0.1; fi
done
keel_cpu1=$(cpu_ms "$keel_pid")
mock_cpu1=$(cpu_ms "$mock_pid")
sleep 1
load_rss=$(rss_kb "$keel_pid")
peak_rss=$(hwm_kb "$keel_pid")
step_errors=$(( $(msum "$tmp/m2" keel_step_errors_total) - errs0 ))
rejected=$(( $(msum "$tmp/m2" keel_http_requests_total 'code="429"') - rej0 ))
other=$(( $(other_codes "$tmp/m2") - other0 ))
retries=$(msum "$tmp/m2" keel_step_retries_total)
mock_total=$(curl -sf --max-time 30 "http://$mock_addr/mock/stats" | grep -o '"total":[0-9]*' | head -1 | cut -d: -f2)
[[ -n ${perf_hook_pid:-} ]] && wait "$perf_hook_pid" 2>/dev/null || true

# --- report ---------------------------------------------------------------------------------
load_s=$(calc %.3f "($t1 - $t0) / 1000")
e2e_s=$(calc %.3f "($t_last - $t0) / 1000")
e2e_rate=$(calc %.0f "$ok / (($t_last - $t0) / 1000)")
sustained=$(calc %.0f "($ok1 - $ok0) / (($t1 - $t0) / 1000)")
row() { printf '  %-38s %s\n' "$1" "$2"; }

echo
echo "keel run throughput: bench3 (llm -> llm -> transform), mock latency 0, sqlite synchronous=FULL"
row "host" "$(nproc) cores, loadavg before load: $load_avg"
row "config" "workers=$WORKERS connections=$CONNECTIONS wrk_threads=$THREADS duration=$DURATION"
echo "  ------------------------------------------------------------------------"
row "submitted runs (201)" "$sub"
row "submit rate (wrk)" "$(calc %.0f "$w_requests / ($w_duration / 1e6)") req/s  ($w_requests requests in $(calc %.2f "$w_duration / 1e6") s)"
row "submit latency p50 / p99" "$(calc %.2f "$w_p50 / 1000") ms / $(calc %.2f "$w_p99 / 1000") ms"
row "submit latency p90 / p99.9 / max" "$(calc %.2f "$w_p90 / 1000") / $(calc %.2f "$w_p999 / 1000") / $(calc %.2f "$w_max / 1000") ms"
row "rejected (429 queue full)" "$rejected"
row "other non-201 answers / socket errors" "$other / $w_errors"
row "sustained completion (load window)" "$sustained runs/s  ($((ok1 - ok0)) runs in $load_s s)"
row "backlog at end of load" "$((sub - (ok1 - ok0))) runs"
row "completed runs" "$ok"
row "end-to-end completion" "$e2e_rate runs/s  ($ok runs, load start -> last completion $e2e_s s)"
row "step checkpoints/s (3x)" "$((e2e_rate * 3))"
row "failed / dead-lettered / cancelled" "$bad  (step errors $step_errors, retries $retries)"
row "LLM calls seen by the mock" "${mock_total:-?}  (expected $((2 * (ok + ok0))))"
row "keel CPU per run" "$(calc %.0f "($keel_cpu1 - $keel_cpu0) * 1000 / ($ok > 0 ? $ok : 1)") us  ($(calc %.2f "($keel_cpu1 - $keel_cpu0) / ($t_last - $t0)") cores)"
row "mock CPU per run" "$(calc %.0f "($mock_cpu1 - $mock_cpu0) * 1000 / ($ok > 0 ? $ok : 1)") us  ($(calc %.2f "($mock_cpu1 - $mock_cpu0) / ($t_last - $t0)") cores)"
row "idle RSS (keel serve)" "$(calc %.1f "$idle_rss / 1024") MiB"
row "RSS after load (peak)" "$(calc %.1f "$load_rss / 1024") MiB  ($(calc %.1f "$peak_rss / 1024") MiB)"
row "database size" "$(du -sh "$tmp/data" | cut -f1)"
echo "  ------------------------------------------------------------------------"
# One line for scripts that aggregate several runs.
echo "RESULT workers=$WORKERS conns=$CONNECTIONS submitted=$sub submit_rps=$(calc %.0f "$w_requests / ($w_duration / 1e6)") p50_ms=$(calc %.2f "$w_p50 / 1000") p99_ms=$(calc %.2f "$w_p99 / 1000") sustained_rps=$sustained e2e_rps=$e2e_rate checkpoints_ps=$((e2e_rate * 3)) bad=$bad rejected=$rejected other_non201=$other idle_rss_mib=$(calc %.1f "$idle_rss / 1024") load_rss_mib=$(calc %.1f "$load_rss / 1024") keel_cpu_us_per_run=$(calc %.0f "($keel_cpu1 - $keel_cpu0) * 1000 / ($ok > 0 ? $ok : 1)") drained=$drained"

((drained)) || die "not every submitted run ended within DRAIN_TIMEOUT=${DRAIN_TIMEOUT}s ($ok succeeded, $bad bad, $sub submitted)"
((bad == 0)) || die "$bad runs did not succeed"
((other == 0 && w_errors == 0)) || die "$other submits answered neither 201 nor 429; $w_errors socket errors"
exit 0
