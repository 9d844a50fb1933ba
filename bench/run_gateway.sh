#!/usr/bin/env bash
# Gateway overhead and throughput: keel in front of a static OpenAI-compatible upstream
# (nginx with ../shared/bench/upstream-nginx.conf: a canned completion, and a 503 path),
# driven by wrk with ../shared/bench/chat-body.json. A benchmark, not a test: it prints a
# table. Needs $KEEL (default build-bench/keel), nginx and wrk (scripts/setup.sh).
#
#   DURATION=10s bench/run_gateway.sh
#
# Figures: latency p50/p99 of the upstream alone and through keel at 1 connection (the
# difference is keel's added latency); requests/s at 64 connections through keel, direct
# and with a failover on every request (the first target answers 503); keel's RSS before
# and after.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
shared=${SHARED:-$root/../shared/bench}
KEEL=${KEEL:-$root/build-bench/keel}
DURATION=${DURATION:-10s}
UP_PORT=${UP_PORT:-18080}
tmp=$(mktemp -d /tmp/keel-gw-bench.XXXXXX)
cleanup() {
  [ -n "${KEEL_PID:-}" ] && kill "$KEEL_PID" 2>/dev/null || true
  [ -f "$tmp/nginx/nginx.pid" ] && kill "$(cat "$tmp/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP_TMP:-}" ] && echo "kept $tmp" || rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
[ -n "${DEBUG:-}" ] && set -x

mkdir -p "$tmp/nginx/logs" "$tmp/nginx/tmp"
sed "s/127.0.0.1:18080/127.0.0.1:${UP_PORT}/" "$shared/upstream-nginx.conf" > "$tmp/nginx/nginx.conf"
nginx -p "$tmp/nginx/" -c "$tmp/nginx/nginx.conf"
UP="http://127.0.0.1:${UP_PORT}"
for _ in $(seq 1 50); do curl -fsS -o /dev/null -X POST "$UP/v1/chat/completions" && break; sleep 0.1; done

cat > "$tmp/keel.yaml" <<YAML
storage: sqlite://$tmp/keel.db
log_level: info
engine: {workers: 0}
server: {handler_threads: 128, io_threads: ${IO_THREADS:-2}}
providers:
  up:   {type: openai, base_url: $UP/v1, model: gpt-4o-mini}
  down: {type: openai, base_url: $UP/fail/v1, model: gpt-4o-mini}
routes:
  gpt-4o-mini: {targets: [{provider: up}]}
  failover:
    targets: [{provider: down}, {provider: up, tier: 2}]
    circuit_breaker: {consecutive_failures: 0, min_requests: 1000000}
    retry_budget: {ratio: 10, min_per_second: 1000000}
YAML
"$KEEL" serve --config "$tmp/keel.yaml" --listen 127.0.0.1:0 2> "$tmp/keel.log" &
KEEL_PID=$!
for _ in $(seq 1 100); do
  port=$(grep -o '"addr":"127.0.0.1:[0-9]*"' "$tmp/keel.log" | head -1 | grep -o '[0-9]*"$' | tr -d '"' || true)
  [ -n "$port" ] && break
  sleep 0.05
done
KEEL_URL="http://127.0.0.1:$port"
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$KEEL_PID/status"; }
rss_start=$(rss)

run() {  # url connections route -> WRK_RESULT line
  BODY_FILE="$shared/chat-body.json" ROUTE="$3" wrk -t1 -c"$2" -d"$DURATION" -s "$here/chat_post.lua" \
    "$1/v1/chat/completions" | grep WRK_RESULT
}
field() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2; }

run "$KEEL_URL" 8 "" >/dev/null  # warm up connections
d1=$(run "$UP" 1 "");        k1=$(run "$KEEL_URL" 1 "")
d64=$(run "$UP" 64 "");      k64=$(run "$KEEL_URL" 64 "")
f1=$(run "$KEEL_URL" 1 failover); f64=$(run "$KEEL_URL" 64 failover)
rss_end=$(rss)

printf '\nkeel gateway: chat-body.json -> keel -> nginx (static completion), wrk -t1, %s per run\n' "$DURATION"
printf '  host: %s cores, loadavg %s\n' "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '  %-44s %10s %10s %10s %8s\n' "run" "req/s" "p50 us" "p99 us" "errors"
for pair in "upstream alone, 1 conn:$d1" "through keel, 1 conn:$k1" "upstream alone, 64 conns:$d64" \
            "through keel, 64 conns:$k64" "keel, failover every request, 1 conn:$f1" \
            "keel, failover every request, 64 conns:$f64"; do
  name=${pair%%:*}; r=${pair#*:}
  printf '  %-44s %10s %10s %10s %8s\n' "$name" "$(field "$r" rps)" "$(field "$r" p50_us)" "$(field "$r" p99_us)" "$(field "$r" errors)"
done
printf '  added latency at 1 conn: p50 %s us, p99 %s us\n' \
  $(( $(field "$k1" p50_us) - $(field "$d1" p50_us) )) $(( $(field "$k1" p99_us) - $(field "$d1" p99_us) ))
printf '  failover cost at 1 conn (p50): %s us over the direct call\n' $(( $(field "$f1" p50_us) - $(field "$k1" p50_us) ))
printf '  keel RSS: %s at start, %s after\n' "$rss_start" "$rss_end"
