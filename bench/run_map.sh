#!/usr/bin/env bash
# Fan-out throughput: one run whose single `map` step sends ITEMS items through an `llm`
# item step to `keel mock-llm` (zero latency), at map concurrency 64 and 16 side by side.
# Each item is one model call through the gateway and one durable checkpoint (SQLite,
# WAL, synchronous=FULL). A benchmark, not a test: it prints a table; it exits non-zero
# only when the run itself is invalid (a run that did not succeed, a missing item output,
# a mock call count that does not match, a process that died).
#
#   bench/run_map.sh                          # ITEMS=1000, concurrency 64 and 16, once
#   REPEAT=3 bench/run_map.sh                 # three rounds; the table of medians
#
# Builds nothing, installs nothing: needs $KEEL (default build-bench/keel) and curl.
#
# Parameters (environment):
#   KEEL          keel binary                                  default: <repo>/build-bench/keel
#   ITEMS         items of the map                             default: 1000
#   CONCURRENCY   map concurrencies to measure, side by side   default: "64 16"
#   REPEAT        rounds (each measures every concurrency once, in turn, on the same
#                 server); >1 also prints medians              default: 1
#   WORKERS       engine.workers of keel serve                 default: 64
#   LISTEN        keel's listen address (port 0: ephemeral)    default: 127.0.0.1:0
#   MOCK_LISTEN   the mock's listen address                    default: 127.0.0.1:0
#   MOCK_LATENCY  the mock's --latency-ms                      default: 0
#   LOG_LEVEL     keel's log_level                             default: info
#   TIMEOUT       seconds a run may take                       default: 300
#   KEEP_TMP=1    keep the temp dir (config, logs, database, run JSON) for inspection
#
# Figures, per concurrency:
#   items/s (run)      ITEMS / the run's duration_ms (finished_at - started_at, by keel's
#                      clock): lease, every item, every checkpoint, the run's end
#                      (target: >= 2000 items/s at concurrency 64)
#   items/s (map step) ITEMS / the map step's duration_ms
#   wall               from the POST to the first GET that shows the run succeeded (the
#                      run is read every 20 ms)
#   keel CPU per item  utime+stime of keel serve over that wall time, per item
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
KEEL=${KEEL:-$root/build-bench/keel}
ITEMS=${ITEMS:-1000}
CONCURRENCY=${CONCURRENCY:-64 16}
REPEAT=${REPEAT:-1}
WORKERS=${WORKERS:-64}
LISTEN=${LISTEN:-127.0.0.1:0}
MOCK_LISTEN=${MOCK_LISTEN:-127.0.0.1:0}
MOCK_LATENCY=${MOCK_LATENCY:-0}
LOG_LEVEL=${LOG_LEVEL:-info}
TIMEOUT=${TIMEOUT:-300}
KEEP_TMP=${KEEP_TMP:-0}

die() { echo "run_map: $*" >&2; exit 1; }
[[ $KEEL == /* ]] || KEEL=$PWD/$KEEL
[[ -x $KEEL ]] || die "no keel binary at $KEEL (build it, or set KEEL)"
command -v curl >/dev/null || die "curl not found"
((ITEMS >= 1 && REPEAT >= 1)) || die "ITEMS and REPEAT must be >= 1"
for c in $CONCURRENCY; do ((c >= 1 && c <= 256)) || die "a map concurrency is 1..256, not $c"; done

source "$here/lib.sh"
bench_init map

mock_total() { curl -sf --max-time 30 "http://$mock_addr/mock/stats" | grep -o '"total":[0-9]*' | head -1 | cut -d: -f2; }

# --- the mock and keel -------------------------------------------------------------------
cd "$tmp"
"$KEEL" mock-llm --listen "$MOCK_LISTEN" --latency-ms "$MOCK_LATENCY" 2>"$tmp/mock.log" &
mock_pid=$!
pids+=("$mock_pid")
mock_addr=$(wait_listening "$tmp/mock.log" "$mock_pid")

{
  cat <<EOF
listen: $LISTEN
storage: sqlite://$tmp/data/keel.db
log_level: $LOG_LEVEL
engine: {workers: $WORKERS}
providers:
  mock: {type: openai, base_url: "http://$mock_addr/v1", model: mock-1}
routes:
  default: {strategy: priority, targets: [{provider: mock}]}
pipelines:
EOF
  for c in $CONCURRENCY; do
    cat <<EOF
  map$c:
    description: "Benchmark: one map of llm calls, concurrency $c"
    steps:
      - id: each
        map:
          over: "{{input.items}}"
          concurrency: $c
          step:
            llm:
              route: default
              messages:
                - {role: user, content: "Summarise item {{index}} of batch {{input.batch}}: {{item}}"}
EOF
  done
} >"$tmp/keel.yaml"

"$KEEL" serve --config "$tmp/keel.yaml" 2>"$tmp/keel.log" &
keel_pid=$!
pids+=("$keel_pid")
keel_addr=$(wait_listening "$tmp/keel.log" "$keel_pid")

# body BATCH N: a submit body with N items.
body() {
  local c=$1 batch=$2 n=$3
  printf '{"pipeline":"map%s","input":{"batch":"%s","items":[' "$c" "$batch"
  awk -v n="$n" -v b="$batch" 'BEGIN {for (i = 0; i < n; i++) printf "%s\"ticket %s-%d: the export button does nothing\"", (i ? "," : ""), b, i}'
  printf ']}}'
}

# one_map CONC BATCH N: submits a run of map$CONC with N items, waits until it ends, and
# sets r=(run_ms step_ms wall_ms cpu_ms items_done mock_calls). Dies when it fails.
one_map() {
  local c=$1 batch=$2 n=$3 f="$tmp/run-$1-$2.json"
  body "$c" "$batch" "$n" >"$tmp/body.json"
  local calls0 cpu0 t0 code id status
  calls0=$(mock_total)
  cpu0=$(cpu_ms "$keel_pid")
  t0=$(now_ms)
  code=$(curl -s -o "$f" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary @"$tmp/body.json" \
    "http://$keel_addr/v1/runs")
  [[ $code == 201 ]] || { head -c 500 "$f" >&2; die "submit answered $code"; }
  id=$(grep -o '"id":"run_[^"]*"' "$f" | head -1 | cut -d'"' -f4)
  local deadline=$((t0 + TIMEOUT * 1000)) t1
  while :; do
    curl -sf --max-time 30 -o "$f" "http://$keel_addr/v1/runs/$id" || die "GET /v1/runs/$id failed"
    t1=$(now_ms)
    status=$(grep -o '"status":"[a-z_]*"' "$f" | head -1 | cut -d'"' -f4)
    case $status in
      succeeded) break ;;
      failed | dead_lettered | cancelled) head -c 1000 "$f" >&2; die "run $id ended $status" ;;
    esac
    kill -0 "$keel_pid" 2>/dev/null || die "keel serve died"
    ((t1 < deadline)) || die "run $id still $status after ${TIMEOUT}s"
    sleep 0.02
  done
  local cpu1 durations run_ms step_ms items_done calls
  cpu1=$(cpu_ms "$keel_pid")
  # The run's JSON names the run's duration_ms before its "steps", then the map step's.
  durations=$(grep -o '"duration_ms":[0-9]*' "$f" | cut -d: -f2)
  run_ms=$(sed -n 1p <<<"$durations")
  step_ms=$(sed -n 2p <<<"$durations")
  items_done=$(grep -o '"items_done":[0-9]*' "$f" | head -1 | cut -d: -f2)
  calls=$(( $(mock_total) - calls0 ))
  r=("${run_ms:-0}" "${step_ms:-0}" $((t1 - t0)) $((cpu1 - cpu0)) "${items_done:-0}" "$calls")
}

# A smoke run per pipeline: a broken setup fails fast; connections to the mock are warm.
for c in $CONCURRENCY; do
  one_map "$c" smoke 8
  ((r[4] == 8 && r[5] == 8)) || die "smoke run of map$c: ${r[4]} items done, ${r[5]} mock calls (want 8)"
done
idle_rss=$(rss_kb "$keel_pid")

declare -A res  # res[CONC,REP] = "run_ms step_ms wall_ms cpu_ms"
loads=()
for rep in $(seq "$REPEAT"); do
  loads+=("$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ,)")
  for c in $CONCURRENCY; do
    one_map "$c" "r$rep" "$ITEMS"
    run_ms=${r[0]} step_ms=${r[1]} wall_ms=${r[2]} cpu_ms=${r[3]}
    ((r[4] == ITEMS)) || die "map$c: ${r[4]} items checkpointed, not $ITEMS"
    ((r[5] == ITEMS)) || die "map$c: the mock saw ${r[5]} calls, not $ITEMS"
    ((run_ms > 0 && step_ms > 0)) || die "map$c: no duration_ms in the run's JSON"
    res[$c,$rep]="$run_ms $step_ms $wall_ms $cpu_ms"
    echo "RESULT rep=$rep concurrency=$c items=$ITEMS run_ms=$run_ms step_ms=$step_ms wall_ms=$wall_ms" \
      "items_per_s=$(calc %.0f "$ITEMS * 1000 / $run_ms") step_items_per_s=$(calc %.0f "$ITEMS * 1000 / $step_ms")" \
      "cpu_us_per_item=$(calc %.0f "$cpu_ms * 1000 / $ITEMS")"
  done
done
peak_rss=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$keel_pid/status")

# median FIELD CONC: the median over the rounds of field FIELD (1 run_ms .. 4 cpu_ms).
median() {
  local field=$1 c=$2
  for rep in $(seq "$REPEAT"); do cut -d' ' -f"$field" <<<"${res[$c,$rep]}"; done | sort -g |
    awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

what="one round"
((REPEAT > 1)) && what="medians of $REPEAT rounds"
echo
echo "keel map fan-out: 1 run x $ITEMS items, llm item step -> keel mock-llm (latency ${MOCK_LATENCY} ms), sqlite synchronous=FULL — $what"
printf '  %-30s %s\n' "host" "$(nproc) cores; loadavg at start of each round: ${loads[*]}"
printf '  %-30s %s\n' "config" "workers=$WORKERS log_level=$LOG_LEVEL"
echo "  ------------------------------------------------------------------------"
printf '  %-30s' "map concurrency"
for c in $CONCURRENCY; do printf '%16s' "$c"; done
echo
row() {  # row LABEL FORMAT-EXPRESSION-OF-MEDIANS
  printf '  %-30s' "$1"
  for c in $CONCURRENCY; do
    local run step wall cpu
    run=$(median 1 "$c"); step=$(median 2 "$c"); wall=$(median 3 "$c"); cpu=$(median 4 "$c")
    printf '%16s' "$(awk -v run="$run" -v step="$step" -v wall="$wall" -v cpu="$cpu" -v n="$ITEMS" "BEGIN {$2}")"
  done
  echo
}
row "items/s (run started->finished)" 'printf "%.0f", n * 1000 / run'
row "items/s (map step)" 'printf "%.0f", n * 1000 / step'
row "run duration" 'printf "%d ms", run'
row "wall (POST -> seen succeeded)" 'printf "%d ms", wall'
row "keel CPU per item" 'printf "%.0f us", cpu * 1000 / n'
echo "  ------------------------------------------------------------------------"
printf '  %-30s %s\n' "keel RSS after smoke / peak" "$(calc %.1f "$idle_rss / 1024") MiB / $(calc %.1f "$peak_rss / 1024") MiB"
if ((REPEAT > 1)); then
  echo "  per round (items/s by run duration):"
  for rep in $(seq "$REPEAT"); do
    printf '    round %s:' "$rep"
    for c in $CONCURRENCY; do printf '  c=%s %s' "$c" "$(calc %.0f "$ITEMS * 1000 / $(cut -d' ' -f1 <<<"${res[$c,$rep]}")")"; done
    echo
  done
fi
exit 0
