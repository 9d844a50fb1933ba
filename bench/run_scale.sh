#!/usr/bin/env bash
# Scale-out throughput on PostgreSQL: the 3-step pipeline of run_throughput.sh (llm -> llm
# -> transform, against one zero-latency `keel mock-llm`), submitted through POST /v1/runs
# by wrk to an API-only `keel serve` (engine.workers: 0), and executed by 1, 2 and 4
# `keel worker` processes sharing one PostgreSQL with durable commits (fsync,
# synchronous_commit and full_page_writes on). In the same invocation, the SQLite
# single-node baseline: one `keel serve` with WORKERS workers on sqlite:// (WAL,
# synchronous=FULL), so that the figures compare side by side. A benchmark, not a test:
# it prints a table; it exits non-zero when a measurement is invalid (a failed, lost or
# doubly executed run, non-2xx answers other than 429, a drain that never finished, a
# process that died).
#
#   bench/run_scale.sh                            # defaults below (7-8 minutes on 2 cores)
#   DURATION=3s REPEAT=1 bench/run_scale.sh       # a quick look
#   WORKER_PROCS="1 2" WORKERS=16 bench/run_scale.sh
#
# Builds nothing, installs nothing: needs $KEEL (default build-bench/keel), wrk, curl,
# psql and PostgreSQL's server binaries (scripts/setup.sh installs them). The PostgreSQL
# is a throwaway one in the temp dir (tests/support/services.sh, KEEL_PG_DURABLE=1), on
# loopback; each measured configuration gets a fresh database in it (CREATE DATABASE, and
# DROP DATABASE afterwards unless KEEP_TMP=1), and every keel process is started afresh.
#
# Configurations, interleaved per repetition to spread the machine's noise
# (pg x1, pg x2, pg x4, sqlite, pg x1, pg x2, ...):
#   pg xN   keel serve (API only, postgres.pool_size API_POOL_SIZE) + N `keel worker`
#           processes (each WORKERS workers, postgres.pool_size WORKER_POOL_SIZE, with
#           --listen for /metrics), on PostgreSQL
#   sqlite  one keel serve with WORKERS workers on sqlite:// (unless SQLITE=0)
# Before each load: one smoke run end to end, a CHECKPOINT of PostgreSQL (so that the
# previous configuration's dirty pages are not written during this one), loadavg noted.
#
# Parameters (environment):
#   KEEL            keel binary                              default: <repo>/build-bench/keel
#   WORKER_PROCS    numbers of `keel worker` processes       default: "1 2 4"
#   WORKERS         engine.workers per worker process (and of the SQLite node)  default: 32
#   WORKER_POOL_SIZE  postgres.pool_size of each worker process  default: WORKERS + 4
#                   (a connection per busy worker, and the heartbeats and timers; each
#                   process also holds a LISTEN and a NOTIFY connection of its own)
#   API_POOL_SIZE   postgres.pool_size of the API node       default: CONNECTIONS
#                   (one per concurrent submit: PostgreSQL commits them as a group)
#   REPEAT          repetitions of every configuration       default: 3
#   SQLITE          1: also measure the SQLite baseline      default: 1
#   DURATION        wrk load duration (wrk syntax)           default: 10s
#   CONNECTIONS     wrk connections (concurrency)            default: 64
#   THREADS         wrk threads                              default: 1
#   DRAIN_TIMEOUT   seconds to wait, after the load, for every submitted run to end  default: 300
#   MAX_QUEUE_DEPTH engine.max_queue_depth (unset: keel's default, 100000); submits beyond
#                   are answered 429 and counted as "rejected", which is not an error
#   KEEP_TMP=1      keep the temp dir (configs, logs, PostgreSQL cluster with every
#                   configuration's database, SQLite files, wrk output)
#
# Figures (per configuration, the median over the REPEAT repetitions unless said):
#   submitted runs        runs accepted (201) during the load (keel_runs_submitted_total)
#   rejected (429)        submits refused because the queue was full (backpressure)
#   submit rate           wrk requests / wrk duration
#   submit p50 / p99      wrk latency percentiles of POST /v1/runs (closed loop, -c CONNECTIONS)
#   sustained completion  runs that succeeded during the load window / load duration
#   end-to-end completion runs succeeded / (time of the last completion - start of the load)
#   x pg x1 (sustained, end-to-end)  the median above divided by the same median of the
#                         configuration with the first number of WORKER_PROCS (1 by default)
#   backlog at end of load  runs accepted but not ended when wrk stopped
#   keel CPU per run      utime+stime (/proc) of every keel node (serve + workers; not the
#                         mock) from the start of the load to the end of the drain, / runs
#   postgres CPU per run  the same for PostgreSQL: the postmaster and all its children
#                         (live ones from /proc/PID/stat, exited ones from the postmaster's
#                         cutime+cstime), / runs
#   mock CPU per run      the same for `keel mock-llm`
#   cores busy            (keel + postgres + mock CPU) / (load start -> end of drain)
#   loadavg (1 min)       /proc/loadavg just before the load (others' work shows here)
#   failed / dead / cancelled  runs that ended in another state than succeeded: the SUM
#                         over the repetitions (must be 0)
#   extra LLM calls       calls the mock saw beyond 2 per succeeded run, SUM (must be 0;
#                         negative: calls missing)
#   keel log warnings/errors  lines at level warning/error/critical in the keel nodes'
#                         logs, SUM (each configuration's logs are kept under KEEP_TMP=1)
#   postgres log WARNING/ERROR+  WARNING, ERROR, FATAL or PANIC lines that PostgreSQL's log
#                         gained during the configuration, SUM
# Every repetition also prints a `RESULT config=... rep=...` line with its own figures.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
KEEL=${KEEL:-$root/build-bench/keel}
WORKER_PROCS=${WORKER_PROCS:-1 2 4}
WORKERS=${WORKERS:-32}
WORKER_POOL_SIZE=${WORKER_POOL_SIZE:-$((WORKERS + 4))}
CONNECTIONS=${CONNECTIONS:-64}
API_POOL_SIZE=${API_POOL_SIZE:-$CONNECTIONS}
REPEAT=${REPEAT:-3}
SQLITE=${SQLITE:-1}
DURATION=${DURATION:-10s}
THREADS=${THREADS:-1}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}
MAX_QUEUE_DEPTH=${MAX_QUEUE_DEPTH:-}
KEEP_TMP=${KEEP_TMP:-0}
services=$root/tests/support/services.sh

die() { echo "run_scale: $*" >&2; exit 1; }
[[ -x $KEEL ]] || die "no keel binary at $KEEL (build it, or set KEEL)"
for tool in wrk curl psql; do command -v "$tool" >/dev/null || die "$tool not found"; done
[[ -x $services ]] || die "no $services"
read -ra procs <<<"$WORKER_PROCS"
((${#procs[@]})) || die "WORKER_PROCS is empty"
max_procs=0
for n in "${procs[@]}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "WORKER_PROCS: \"$n\" is not a positive number"
  ((n > max_procs)) && max_procs=$n
done
# services.sh's cluster has max_connections = 300 (3 reserved for superusers); each
# process holds its pool, a LISTEN and a NOTIFY connection.
need=$(( API_POOL_SIZE + 2 + max_procs * (WORKER_POOL_SIZE + 2) + 2 ))
((need <= 297)) || die "$need PostgreSQL connections needed (max_connections is 300): lower WORKERS, WORKER_POOL_SIZE, API_POOL_SIZE or WORKER_PROCS"

source "$here/lib.sh"
bench_init scale
# As root, PostgreSQL runs as `postgres`, which must reach its data dir through ours.
chmod 711 "$tmp"

# --- helpers --------------------------------------------------------------------------------
# scrape ADDR FILE: fetches a node's /metrics into FILE.
scrape() { curl -sf --max-time 10 "http://$1/metrics" -o "$2" || die "GET http://$1/metrics failed"; }
# worker_sum NAME: sum of metric NAME over the worker nodes' /metrics (scraped now).
worker_sum() {
  local s=0 a
  for a in "${worker_addrs[@]}"; do
    scrape "$a" "$run_dir/mw"
    s=$((s + $(msum "$run_dir/mw" "$1")))
  done
  echo "$s"
}
# stat_cpu_ms PID [CHILDREN]: utime+stime of PID in ms (with CHILDREN=1, plus the
# cutime+cstime of its reaped children); 0 if it is gone. Fields counted after the
# command name, which may hold spaces.
stat_cpu_ms() {
  local line
  line=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  awk -v hz="$(getconf CLK_TCK)" -v ch="${2:-0}" '{
        sub(/^.*\) /, ""); t = $12 + $13; if (ch) t += $14 + $15; print int(t * 1000 / hz)}' <<<"$line"
}
# keel_cpu_ms: the keel nodes of the configuration being measured.
keel_cpu_ms() {
  local s=0 p
  for p in "${node_pids[@]}"; do s=$((s + $(stat_cpu_ms "$p"))); done
  echo "$s"
}
# pg_cpu_ms: PostgreSQL, the postmaster and every process it started.
pg_cpu_ms() {
  local pm s=0 c
  pm=$(head -1 "$tmp/pg/pg/postmaster.pid")
  for c in $(pgrep -P "$pm"); do s=$((s + $(stat_cpu_ms "$c"))); done
  echo $((s + $(stat_cpu_ms "$pm" 1)))
}
log_problems() {  # warning/error lines in the given logs
  cat "$@" | grep -cE '"level":"(warning|error|critical)"' || true
}
psql_admin() { psql "$admin_url" -X -q -v ON_ERROR_STOP=1 -c "$1" >/dev/null || die "psql: $1 failed"; }

# keel.yaml for the mock, STORAGE, WORKERS and POOL.
write_config() {
  local file=$1 storage=$2 workers=$3 pool=$4
  {
    cat <<EOF
listen: 127.0.0.1:0
storage: $storage
postgres: {pool_size: $pool}
engine: {workers: $workers${MAX_QUEUE_DEPTH:+, max_queue_depth: $MAX_QUEUE_DEPTH}}
EOF
    bench3_yaml
  } >"$file"
}

problems=()
results=$tmp/results.txt
: >"$results"

# measure CONFIG REP: CONFIG is pgN (N worker processes) or sqlite. Appends a RESULT line.
measure() {
  local config=$1 rep=$2
  run_dir=$tmp/$config-r$rep
  mkdir -p "$run_dir"
  node_pids=()
  worker_addrs=()
  local db="" pg=0 n=0
  [[ $config == pg* ]] && { pg=1; n=${config#pg}; db=keel_${config}_r$rep; }

  # --- start the nodes ----------------------------------------------------------------------
  curl -sf --max-time 10 -X POST "http://$mock_addr/mock/reset" -o /dev/null || die "POST /mock/reset failed"
  local serve_log=$run_dir/serve.log pglog0
  pglog0=$(wc -l <"$pg_log")
  if ((pg)); then
    psql_admin "CREATE DATABASE $db"
    local url="postgres://keel@127.0.0.1:$pg_port/$db"
    write_config "$run_dir/api.yaml" "$url" 0 "$API_POOL_SIZE"
    write_config "$run_dir/worker.yaml" "$url" "$WORKERS" "$WORKER_POOL_SIZE"
    "$KEEL" serve --config "$run_dir/api.yaml" --listen 127.0.0.1:0 2>"$serve_log" &
  else
    write_config "$run_dir/keel.yaml" "sqlite://$run_dir/data/keel.db" "$WORKERS" 16
    "$KEEL" serve --config "$run_dir/keel.yaml" --listen 127.0.0.1:0 2>"$serve_log" &
  fi
  serve_pid=$!
  pids+=("$serve_pid"); node_pids+=("$serve_pid")
  # The API node creates the schema before it listens; the workers start after it.
  serve_addr=$(wait_listening "$serve_log" "$serve_pid")
  local i wpids=()
  for ((i = 1; i <= n; i++)); do
    "$KEEL" worker --config "$run_dir/worker.yaml" --listen 127.0.0.1:0 2>"$run_dir/worker$i.log" &
    wpids+=($!)
    pids+=($!); node_pids+=($!)
  done
  for ((i = 1; i <= n; i++)); do
    worker_addrs+=("$(wait_listening "$run_dir/worker$i.log" "${wpids[i - 1]}")")
  done

  # --- smoke: one run end to end --------------------------------------------------------------
  local code
  code=$(curl -s -o "$run_dir/smoke.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"pipeline":"bench3","input":{"n":0,"worker":0,"customer":"smoke","ticket":"smoke test"}}' \
    "http://$serve_addr/v1/runs")
  [[ $code == 201 ]] || { cat "$run_dir/smoke.json" >&2; die "$config: smoke submit answered $code"; }
  for _ in $(seq 100); do
    scrape "$serve_addr" "$run_dir/m0"
    [[ $(msum "$run_dir/m0" keel_runs 'status="succeeded"') -ge 1 ]] && break
    [[ $(terminal_bad "$run_dir/m0") -gt 0 ]] && { tail -5 "$run_dir"/*.log >&2; die "$config: the smoke run did not succeed"; }
    sleep 0.1
  done
  [[ $(msum "$run_dir/m0" keel_runs 'status="succeeded"') -ge 1 ]] || die "$config: the smoke run did not finish in 10s"
  ((pg)) && psql_admin CHECKPOINT

  # --- load -------------------------------------------------------------------------------------
  ((pg)) || worker_addrs=("$serve_addr")  # the node whose workers count step errors
  scrape "$serve_addr" "$run_dir/m0"
  local sub0 ok0 bad0 rej0 other0 errs0 retries0 kcpu0 pcpu0 mcpu0 load1
  sub0=$(msum "$run_dir/m0" keel_runs_submitted_total)
  ok0=$(msum "$run_dir/m0" keel_runs 'status="succeeded"')
  bad0=$(terminal_bad "$run_dir/m0")
  rej0=$(msum "$run_dir/m0" keel_http_requests_total 'code="429"')
  other0=$(other_codes "$run_dir/m0")
  errs0=$(worker_sum keel_step_errors_total)
  retries0=$(worker_sum keel_step_retries_total)
  load1=$(cut -d' ' -f1 /proc/loadavg)
  kcpu0=$(keel_cpu_ms); mcpu0=$(stat_cpu_ms "$mock_pid"); pcpu0=$(pg_cpu_ms)

  local t0 t1
  t0=$(now_ms)
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$here/submit_run.lua" \
    "http://$serve_addr" >"$run_dir/wrk.out" 2>&1 &
  local wrk_pid=$!
  pids+=("$wrk_pid")
  wait "$wrk_pid" || { cat "$run_dir/wrk.out" >&2; die "$config: wrk failed"; }
  forget_pids "$wrk_pid"
  t1=$(now_ms)
  scrape "$serve_addr" "$run_dir/m1"
  local ok1
  ok1=$(msum "$run_dir/m1" keel_runs 'status="succeeded"')

  local wrk_line
  wrk_line=$(grep '^WRK_RESULT' "$run_dir/wrk.out") || { cat "$run_dir/wrk.out" >&2; die "$config: no WRK_RESULT line"; }
  wrkv() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<" ${wrk_line#WRK_RESULT}"; }
  local w_requests w_duration w_errors w_p50 w_p99
  w_requests=$(wrkv requests); w_duration=$(wrkv duration_us); w_errors=$(wrkv errors)
  w_p50=$(wrkv p50_us); w_p99=$(wrkv p99_us)

  # --- drain: wait (bounded) until every submitted run has ended -------------------------------
  local deadline t_last=$t1 prev_ok=-1 drained=0 t_now sub ok bad p
  deadline=$(($(now_ms) + DRAIN_TIMEOUT * 1000))
  while :; do
    scrape "$serve_addr" "$run_dir/m2"
    t_now=$(now_ms)
    sub=$(($(msum "$run_dir/m2" keel_runs_submitted_total) - sub0))
    ok=$(($(msum "$run_dir/m2" keel_runs 'status="succeeded"') - ok0))
    bad=$(($(terminal_bad "$run_dir/m2") - bad0))
    ((ok != prev_ok)) && t_last=$t_now
    prev_ok=$ok
    if ((ok + bad >= sub)); then drained=1; break; fi
    for p in "${node_pids[@]}"; do kill -0 "$p" 2>/dev/null || { tail -20 "$run_dir"/*.log >&2; die "$config: a keel node (pid $p) died during the drain"; }; done
    ((t_now < deadline)) || break
    # Each /metrics call counts every run in the database, so poll slowly while the
    # backlog is large and every 0.1 s near the end, where the timing matters.
    if ((sub - ok - bad > 2000)); then sleep 0.5; else sleep 0.1; fi
  done
  local t2 kcpu1 pcpu1 mcpu1
  t2=$(now_ms)
  kcpu1=$(keel_cpu_ms); mcpu1=$(stat_cpu_ms "$mock_pid"); pcpu1=$(pg_cpu_ms)
  local rejected other step_errors retries mock_total extra
  rejected=$(($(msum "$run_dir/m2" keel_http_requests_total 'code="429"') - rej0))
  other=$(($(other_codes "$run_dir/m2") - other0))
  step_errors=$(($(worker_sum keel_step_errors_total) - errs0))
  retries=$(($(worker_sum keel_step_retries_total) - retries0))
  mock_total=$(curl -sf --max-time 60 "http://$mock_addr/mock/stats" | grep -o '"total":[0-9]*' | head -1 | cut -d: -f2)
  extra=$((${mock_total:-0} - 2 * (ok + ok0)))

  # --- stop this configuration's nodes, drop its database -------------------------------------
  stop_pids "${node_pids[@]}"
  forget_pids "${node_pids[@]}"
  local logs pglogs
  logs=$(log_problems "$run_dir"/*.log)
  tail -n +"$((pglog0 + 1))" "$pg_log" >"$run_dir/postgres.log"
  pglogs=$(grep -cE '\] (WARNING|ERROR|FATAL|PANIC): ' "$run_dir/postgres.log" || true)
  if ((pg)) && [[ $KEEP_TMP != 1 ]]; then psql_admin "DROP DATABASE $db WITH (FORCE)"; fi
  [[ $KEEP_TMP == 1 ]] || rm -rf "$run_dir/data"

  local runs=$((ok > 0 ? ok : 1)) span=$((t_last - t0))
  local line
  line="RESULT config=$config rep=$rep submitted=$sub rejected=$rejected"
  line+=" submit_rps=$(calc %.0f "$w_requests / ($w_duration / 1e6)") p50_ms=$(calc %.2f "$w_p50 / 1000") p99_ms=$(calc %.2f "$w_p99 / 1000")"
  line+=" sustained_rps=$(calc %.0f "($ok1 - $ok0) / (($t1 - $t0) / 1000)") e2e_rps=$(calc %.0f "$ok / ($span / 1000)")"
  line+=" backlog=$((sub - (ok1 - ok0))) completed=$ok"
  line+=" keel_cpu_us=$(calc %.0f "($kcpu1 - $kcpu0) * 1000 / $runs") pg_cpu_us=$(calc %.0f "($pcpu1 - $pcpu0) * 1000 / $runs")"
  line+=" mock_cpu_us=$(calc %.0f "($mcpu1 - $mcpu0) * 1000 / $runs")"
  line+=" cores=$(calc %.2f "(($kcpu1 - $kcpu0) + ($pcpu1 - $pcpu0) + ($mcpu1 - $mcpu0)) / ($t2 - $t0)")"
  line+=" loadavg=$load1 bad=$bad extra_calls=$extra log_problems=$logs pg_log_problems=$pglogs step_errors=$step_errors retries=$retries"
  line+=" other_non201=$other socket_errors=$w_errors drained=$drained"
  echo "$line" | tee -a "$results"

  ((drained)) || problems+=("$config rep $rep: not every submitted run ended within DRAIN_TIMEOUT=${DRAIN_TIMEOUT}s ($ok succeeded, $bad bad, $sub submitted)")
  ((bad == 0)) || problems+=("$config rep $rep: $bad runs did not succeed")
  ((extra == 0)) || problems+=("$config rep $rep: the mock saw ${mock_total:-?} LLM calls, expected $((2 * (ok + ok0)))")
  ((other == 0 && w_errors == 0)) || problems+=("$config rep $rep: $other submits answered neither 201 nor 429; $w_errors socket errors")
  return 0
}

# --- shared services: PostgreSQL (durable) and the mock --------------------------------------
if [[ $KEEP_TMP == 1 ]]; then pg_stop=postgres-stop; else pg_stop=postgres-remove; fi
exit_hooks+=("\"$services\" $pg_stop \"$tmp/pg\" >/dev/null 2>&1")
admin_url=$(KEEL_PG_DURABLE=1 "$services" postgres-start "$tmp/pg") || die "PostgreSQL did not start"
pg_port=$(cat "$tmp/pg/postgres.port")
pg_log=$tmp/pg/pg/server.log
pg_settings=$(psql "$admin_url" -X -At -c "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings
                                           WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method')")
pg_version=$(psql "$admin_url" -X -At -c "SHOW server_version")

cd "$tmp"
"$KEEL" mock-llm --listen 127.0.0.1:0 2>"$tmp/mock.log" &
mock_pid=$!
pids+=("$mock_pid")
mock_addr=$(wait_listening "$tmp/mock.log" "$mock_pid")

configs=()
for n in "${procs[@]}"; do configs+=("pg$n"); done
((SQLITE)) && configs+=(sqlite)
echo "run_scale: ${configs[*]}, $REPEAT repetitions, $DURATION each; PostgreSQL $pg_version ($pg_settings)" >&2
for ((rep = 1; rep <= REPEAT; rep++)); do
  for config in "${configs[@]}"; do measure "$config" "$rep"; done
done

# --- report: medians -----------------------------------------------------------------------
# median CONFIG KEY: the median of KEY over CONFIG's RESULT lines; sumof CONFIG KEY: the sum.
values() {
  awk -v c="$1" -v k="$2" '$2 == "config=" c {for (i = 3; i <= NF; i++) {split($i, kv, "="); if (kv[1] == k) print kv[2]}}' "$results"
}
median() {
  values "$1" "$2" | sort -g | awk '{v[NR] = $1} END {if (!NR) {print "?"; exit}
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m}'
}
sumof() { values "$1" "$2" | awk '{s += $1} END {print s + 0}'; }

label() { [[ $1 == sqlite ]] && echo "sqlite (1 node)" || echo "pg x${1#pg}"; }
base=pg${procs[0]}
echo
echo "keel scale-out: bench3 (llm -> llm -> transform), mock latency 0, durable commits"
echo "  host: $(nproc) cores; PostgreSQL $pg_version: $pg_settings; sqlite: synchronous=FULL"
echo "  pg xN: 1 keel serve (API only, pool $API_POOL_SIZE) + N keel worker (each $WORKERS workers, pool $WORKER_POOL_SIZE)"
echo "  sqlite: 1 keel serve with $WORKERS workers; wrk: $CONNECTIONS connections, $THREADS thread(s), $DURATION per load"
echo "  medians of $REPEAT repetitions (interleaved); failures, extra calls and log lines are sums"
echo
printf '| %-34s |' figure
for c in "${configs[@]}"; do printf ' %15s |' "$(label "$c")"; done
echo
printf '| %-34s |' "$(printf -- '-%.0s' $(seq 34))"
for _ in "${configs[@]}"; do printf ' %15s |' "$(printf -- '-%.0s' $(seq 15))"; done
echo
trow() {  # trow LABEL KEY FORMAT [sum]
  printf '| %-34s |' "$1"
  local c v
  for c in "${configs[@]}"; do
    if [[ ${4:-} == sum ]]; then v=$(sumof "$c" "$2"); else v=$(median "$c" "$2"); fi
    [[ $v == "?" ]] || v=$(calc "$3" "$v")
    printf ' %15s |' "$v"
  done
  echo
}
ratio_row() {  # ratio_row LABEL KEY: median / median of the base configuration
  printf '| %-34s |' "$1"
  local c b v
  b=$(median "$base" "$2")
  for c in "${configs[@]}"; do
    v=$(median "$c" "$2")
    if [[ $b == "?" || $v == "?" ]] || awk "BEGIN {exit !($b == 0)}"; then v="?"; else v=$(calc "x%.2f" "$v / $b"); fi
    printf ' %15s |' "$v"
  done
  echo
}
trow "submitted runs" submitted %.0f
trow "rejected (429)" rejected %.0f
trow "submit rate (req/s)" submit_rps %.0f
trow "submit p50 (ms)" p50_ms %.2f
trow "submit p99 (ms)" p99_ms %.2f
trow "sustained completion (runs/s)" sustained_rps %.0f
ratio_row "  vs $(label "$base")" sustained_rps
trow "end-to-end completion (runs/s)" e2e_rps %.0f
ratio_row "  vs $(label "$base")" e2e_rps
trow "backlog at end of load (runs)" backlog %.0f
trow "keel CPU per run (us)" keel_cpu_us %.0f
trow "postgres CPU per run (us)" pg_cpu_us %.0f
trow "mock CPU per run (us)" mock_cpu_us %.0f
trow "cores busy (keel+pg+mock)" cores %.2f
trow "loadavg (1 min) before load" loadavg %.2f
trow "failed / dead / cancelled (sum)" bad %.0f sum
trow "extra LLM calls (sum)" extra_calls %.0f sum
trow "keel log warnings/errors (sum)" log_problems %.0f sum
trow "postgres log WARNING/ERROR+ (sum)" pg_log_problems %.0f sum
echo

if ((${#problems[@]})); then
  printf 'run_scale: %s\n' "${problems[@]}" >&2
  exit 1
fi
exit 0
