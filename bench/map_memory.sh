#!/usr/bin/env bash
# Memory of a large map: what keel serve holds while one run fans out over ITEMS items,
# after it ends, and after a map is cancelled halfway. A benchmark, not a test: it prints
# a table; it exits non-zero only when a run itself is invalid (a run that did not end as
# expected, a missing item, a process that died).
#
#   bench/map_memory.sh                          # ITEMS=100000, the build-bench binary
#   KEEL=/tmp/keel-old bench/map_memory.sh       # another binary (a before/after comparison)
#
# Builds nothing, installs nothing: needs $KEEL (default build-bench/keel) and curl.
#
# Two phases, each on a fresh keel serve (so that one's peak is not the other's):
#   complete  one run of a map over ITEMS strings (about 50 bytes each; the request body
#             is about ITEMS x 55 bytes), a `transform` item step, concurrency
#             CONCURRENCY: RSS before, the peak while it runs (VmHWM, reset before the
#             submit), and RSS a second after it was seen succeeded.
#   cancel    the same map with an `llm` item step to keel mock-llm (MOCK_LATENCY ms per
#             call): cancelled once CANCEL_AT items are checkpointed; RSS at the cancel and
#             once the map has stopped (the mock's call count stands still for a second).
#
# Parameters (environment):
#   KEEL          keel binary                       default: <repo>/build-bench/keel
#   ITEMS         items of each map                 default: 100000
#   CONCURRENCY   map concurrency                   default: 64
#   CANCEL_AT     items done when the cancel is sent default: 10000
#   MOCK_LATENCY  the mock's --latency-ms (cancel)  default: 20
#   TIMEOUT       seconds a run may take            default: 600
#   KEEP_TMP=1    keep the temp dir (configs, logs, databases) for inspection
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
KEEL=${KEEL:-$root/build-bench/keel}
ITEMS=${ITEMS:-100000}
CONCURRENCY=${CONCURRENCY:-64}
CANCEL_AT=${CANCEL_AT:-10000}
MOCK_LATENCY=${MOCK_LATENCY:-20}
TIMEOUT=${TIMEOUT:-600}

die() { echo "map_memory: $*" >&2; exit 1; }
[[ $KEEL == /* ]] || KEEL=$PWD/$KEEL
[[ -x $KEEL ]] || die "no keel binary at $KEEL (build it, or set KEEL)"
command -v curl >/dev/null || die "curl not found"
((ITEMS >= 1 && CANCEL_AT < ITEMS)) || die "need ITEMS >= 1 and CANCEL_AT < ITEMS"

source "$here/lib.sh"
bench_init map-memory
cd "$tmp"

mib() { calc %.1f "$1 / 1024"; }
mock_total() { curl -sf --max-time 30 "http://$mock_addr/mock/stats" | grep -o '"total":[0-9]*' | head -1 | cut -d: -f2; }

"$KEEL" mock-llm --listen 127.0.0.1:0 --latency-ms "$MOCK_LATENCY" 2>"$tmp/mock.log" &
mock_pid=$!
pids+=("$mock_pid")
mock_addr=$(wait_listening "$tmp/mock.log" "$mock_pid")

# The input: ITEMS strings of about 50 bytes.
{
  printf '{"pipeline":"PIPELINE","input":{"items":['
  awk -v n="$ITEMS" 'BEGIN {for (i = 0; i < n; i++) printf "%s\"ticket %07d: the export button does nothing\"", (i ? "," : ""), i}'
  printf ']}}'
} >"$tmp/input.json"
body_bytes=$(stat -c %s "$tmp/input.json")

# start PHASE: a fresh keel serve with its own database; sets keel_pid and keel_addr.
start() {
  mkdir -p "$tmp/$1"
  cat >"$tmp/$1/keel.yaml" <<EOF
listen: 127.0.0.1:0
storage: sqlite://$tmp/$1/keel.db
log_level: info
server: {max_body_bytes: 64MiB}
providers:
  mock: {type: openai, base_url: "http://$mock_addr/v1", model: mock-1}
routes:
  default: {strategy: priority, targets: [{provider: mock}]}
pipelines:
  each_transform:
    steps:
      - id: each
        map:
          over: "{{input.items}}"
          concurrency: $CONCURRENCY
          step:
            transform: {n: "{{index}}", text: "{{item}}"}
  each_llm:
    steps:
      - id: each
        map:
          over: "{{input.items}}"
          concurrency: $CONCURRENCY
          step:
            llm:
              route: default
              messages: [{role: user, content: "Summarise {{item}}"}]
EOF
  "$KEEL" serve --config "$tmp/$1/keel.yaml" 2>"$tmp/$1/keel.log" &
  keel_pid=$!
  pids+=("$keel_pid")
  keel_addr=$(wait_listening "$tmp/$1/keel.log" "$keel_pid")
}

# submit PIPELINE: submits the input to PIPELINE; sets run_id.
submit() {
  local code
  sed "s/\"PIPELINE\"/\"$1\"/" "$tmp/input.json" >"$tmp/body.json"
  code=$(curl -s -o "$tmp/submit.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    --data-binary @"$tmp/body.json" "http://$keel_addr/v1/runs")
  [[ $code == 201 ]] || { head -c 500 "$tmp/submit.json" >&2; die "submit answered $code"; }
  run_id=$(grep -o '"id":"run_[^"]*"' "$tmp/submit.json" | head -1 | cut -d'"' -f4)
}

# poll: reads the run; sets status and items_done.
poll() {
  curl -sf --max-time 60 -o "$tmp/run.json" "http://$keel_addr/v1/runs/$run_id" || die "GET /v1/runs/$run_id failed"
  status=$(grep -o '"status":"[a-z_]*"' "$tmp/run.json" | head -1 | cut -d'"' -f4 || true)
  items_done=$(grep -o '"items_done":[0-9]*' "$tmp/run.json" | head -1 | cut -d: -f2 || true)
  items_done=${items_done:-0}
  kill -0 "$keel_pid" 2>/dev/null || die "keel serve died"
}

# --- complete --------------------------------------------------------------------------
start complete
idle_rss=$(rss_kb "$keel_pid")
echo 5 >"/proc/$keel_pid/clear_refs"  # resets VmHWM
t0=$(now_ms)
submit each_transform
while :; do
  poll
  case $status in
    succeeded) break ;;
    failed | dead_lettered | cancelled) head -c 1000 "$tmp/run.json" >&2; die "run $run_id ended $status" ;;
  esac
  (($(now_ms) - t0 < TIMEOUT * 1000)) || die "run $run_id still $status after ${TIMEOUT}s"
  sleep 0.5
done
complete_ms=$(($(now_ms) - t0))
((items_done == ITEMS)) || die "the map checkpointed $items_done items, not $ITEMS"
complete_peak=$(hwm_kb "$keel_pid")
sleep 1  # the worker lets the run go just after its last commit
complete_after=$(rss_kb "$keel_pid")
complete_anon=$(awk '$1 == "RssAnon:" {print $2}' "/proc/$keel_pid/status")
db_bytes=$(du -cb "$tmp/complete"/keel.db* | tail -1 | cut -f1)
stop_pids "$keel_pid"
forget_pids "$keel_pid"

# --- cancel ----------------------------------------------------------------------------
start cancel
cancel_idle=$(rss_kb "$keel_pid")
echo 5 >"/proc/$keel_pid/clear_refs"
t0=$(now_ms)
submit each_llm
while :; do
  poll
  [[ $status == queued || $status == running ]] || die "run $run_id ended $status before the cancel"
  ((items_done >= CANCEL_AT)) && break
  (($(now_ms) - t0 < TIMEOUT * 1000)) || die "run $run_id: $items_done items after ${TIMEOUT}s"
  sleep 0.2
done
at_cancel=$(rss_kb "$keel_pid")
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$keel_addr/v1/runs/$run_id/cancel")
[[ $code == 200 ]] || die "cancel answered $code"
# The map has stopped when the mock sees no new call for a second.
prev=$(mock_total)
while :; do
  sleep 1
  cur=$(mock_total)
  ((cur == prev)) && break
  prev=$cur
done
poll
[[ $status == cancelled ]] || die "run $run_id is $status after the cancel"
cancel_peak=$(hwm_kb "$keel_pid")
after_cancel=$(rss_kb "$keel_pid")
cancel_anon=$(awk '$1 == "RssAnon:" {print $2}' "/proc/$keel_pid/status")

echo
echo "keel map memory: $ITEMS items ($(mib $((body_bytes / 1024))) MiB request), concurrency $CONCURRENCY, sqlite — $KEEL"
echo "  ------------------------------------------------------------------------"
printf '  %-44s %s\n' "complete: RSS before / peak / after" "$(mib "$idle_rss") / $(mib "$complete_peak") / $(mib "$complete_after") MiB"
printf '  %-44s %s\n' "complete: of RSS after, anonymous (heap)" "$(mib "$complete_anon") MiB"
printf '  %-44s %s\n' "complete: wall, submit to seen succeeded" "$complete_ms ms ($(calc %.0f "$ITEMS * 1000 / $complete_ms") items/s)"
printf '  %-44s %s\n' "complete: database on disk" "$(mib $((db_bytes / 1024))) MiB"
printf '  %-44s %s\n' "cancel at $CANCEL_AT items: RSS before / at / peak / after" \
  "$(mib "$cancel_idle") / $(mib "$at_cancel") / $(mib "$cancel_peak") / $(mib "$after_cancel") MiB"
printf '  %-44s %s\n' "cancel: of RSS after, anonymous (heap)" "$(mib "$cancel_anon") MiB"
exit 0
