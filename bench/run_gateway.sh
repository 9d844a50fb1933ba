#!/usr/bin/env bash
# Gateway overhead and throughput: keel in front of a static OpenAI-compatible upstream
# (nginx with ../shared/bench/upstream-nginx.conf: a canned completion, and a 503 path),
# driven by wrk with ../shared/bench/chat-body.json. A benchmark, not a test: it prints a
# table. Needs $KEEL (default build-bench/keel), nginx and wrk (scripts/setup.sh).
#
#   DURATION=10s bench/run_gateway.sh
#   MODE=limits RUNS=3 DURATION=8s bench/run_gateway.sh
#
# Figures (default mode): latency p50/p99 of the upstream alone and through keel at 1
# connection (the difference is keel's added latency); requests/s at 64 connections
# through keel, direct and with a failover on every request (the first target answers
# 503); keel's RSS before and after.
#
# MODE=limits: rpm limits kept by each node vs shared in Redis, side by side in one run.
# Two keel processes on the same upstream, one without and one with `redis:` (a
# throwaway redis-server on loopback, tests/support/services.sh); routes without limits,
# with rpm (never reached: the cost of the bookkeeping, not of refusals), with rpm and
# tpm (a take and a usage correction per call), and answered from the cache. RUNS rounds,
# the rows interleaved within each, medians printed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
shared=${SHARED:-$root/../shared/bench}
KEEL=${KEEL:-$root/build-bench/keel}
DURATION=${DURATION:-10s}
UP_PORT=${UP_PORT:-18080}
MODE=${MODE:-overhead}
RUNS=${RUNS:-3}
tmp=$(mktemp -d /tmp/keel-gw-bench.XXXXXX)
cleanup() {
  [ -n "${KEEL_PID:-}" ] && kill "$KEEL_PID" 2>/dev/null || true
  [ -n "${KEEL_REDIS_PID:-}" ] && kill "$KEEL_REDIS_PID" 2>/dev/null || true
  [ -f "$tmp/redis/redis.pid" ] && "$root/tests/support/services.sh" redis-stop "$tmp/redis" || true
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

run() {  # url connections route -> WRK_RESULT line
  BODY_FILE="$shared/chat-body.json" ROUTE="$3" wrk -t1 -c"$2" -d"$DURATION" -s "$here/chat_post.lua" \
    "$1/v1/chat/completions" | grep WRK_RESULT
}
field() { echo "$1" | tr ' ' '\n' | grep "^$2=" | cut -d= -f2; }
start_keel() {  # config log pid-variable -> sets the pid variable and STARTED_URL
  "$KEEL" serve --config "$1" --listen 127.0.0.1:0 2> "$2" &
  printf -v "$3" '%s' "$!"
  local p=""
  for _ in $(seq 1 100); do
    p=$(grep -o '"addr":"127.0.0.1:[0-9]*"' "$2" | head -1 | grep -o '[0-9]*"$' | tr -d '"' || true)
    [ -n "$p" ] && break
    sleep 0.05
  done
  [ -n "$p" ] || { cat "$2" >&2; echo "keel did not start" >&2; exit 1; }
  STARTED_URL="http://127.0.0.1:$p"
}
median() { sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }

if [ "$MODE" = limits ]; then
  redis_url=$("$root/tests/support/services.sh" redis-start "$tmp/redis" | tail -1)
  for which in local redis; do
    {
      echo "storage: sqlite://$tmp/keel-$which.db"
      echo "log_level: info"
      echo "engine: {workers: 0}"
      echo "server: {handler_threads: 128, io_threads: ${IO_THREADS:-2}}"
      [ "$which" = redis ] && echo "redis: {url: \"$redis_url\", key_prefix: \"bench:\"}"
      cat <<YAML
providers:
  up:      {type: openai, base_url: $UP/v1, model: gpt-4o-mini}
  up_rpm:  {type: openai, base_url: $UP/v1, model: gpt-4o-mini, limits: {rpm: 1000000000}}
  up_both: {type: openai, base_url: $UP/v1, model: gpt-4o-mini, limits: {rpm: 1000000000, tpm: 1000000000000}}
routes:
  plain:  {targets: [{provider: up}]}
  rpm:    {targets: [{provider: up_rpm}]}
  both:   {targets: [{provider: up_both}]}
  cached: {targets: [{provider: up}], cache: {ttl: 1h}}
YAML
    } > "$tmp/keel-$which.yaml"
  done
  start_keel "$tmp/keel-local.yaml" "$tmp/keel-local.log" KEEL_PID; local_url=$STARTED_URL
  start_keel "$tmp/keel-redis.yaml" "$tmp/keel-redis.log" KEEL_REDIS_PID; redis_keel_url=$STARTED_URL
  # name|url|connections|route
  rows=("no limits, 64 conns|$local_url|64|plain"
        "rpm, local buckets, 64 conns|$local_url|64|rpm"
        "rpm, Redis, 64 conns|$redis_keel_url|64|rpm"
        "rpm+tpm, local buckets, 64 conns|$local_url|64|both"
        "rpm+tpm, Redis, 64 conns|$redis_keel_url|64|both"
        "cache hits, 64 conns|$local_url|64|cached"
        "rpm, local buckets, 1 conn|$local_url|1|rpm"
        "rpm, Redis, 1 conn|$redis_keel_url|1|rpm")
  run "$local_url" 8 plain >/dev/null; run "$redis_keel_url" 8 rpm >/dev/null  # warm up
  mkdir -p "$tmp/res"
  for round in $(seq 1 "$RUNS"); do
    for i in "${!rows[@]}"; do
      IFS='|' read -r name url conns route <<<"${rows[$i]}"
      r=$(run "$url" "$conns" "$route")
      echo "$(field "$r" rps) $(field "$r" p50_us) $(field "$r" p99_us) $(field "$r" errors)" >> "$tmp/res/$i"
      echo "round $round: $name: $r" >&2
    done
  done
  printf '\nkeel gateway, rpm/tpm limits local vs in Redis: chat-body.json -> keel -> nginx, wrk -t1, %s per run, medians of %s\n' "$DURATION" "$RUNS"
  printf '  host: %s cores, loadavg %s; redis-server on loopback\n' "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf '  %-36s %10s %10s %10s %8s\n' "run" "req/s" "p50 us" "p99 us" "errors"
  for i in "${!rows[@]}"; do
    IFS='|' read -r name _ _ _ <<<"${rows[$i]}"
    printf '  %-36s %10s %10s %10s %8s\n' "$name" "$(cut -d' ' -f1 "$tmp/res/$i" | median)" \
      "$(cut -d' ' -f2 "$tmp/res/$i" | median)" "$(cut -d' ' -f3 "$tmp/res/$i" | median)" \
      "$(cut -d' ' -f4 "$tmp/res/$i" | sort -n | tail -1)"
  done
  printf '  redis keel: %s\n' "$(curl -s "$redis_keel_url/metrics" | grep -E '^keel_redis_(up|errors_total|fallbacks_total)' | grep -v ' 0$' | tr '\n' ' ')"
  exit 0
fi

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
