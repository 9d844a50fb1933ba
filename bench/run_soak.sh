#!/usr/bin/env bash
# Memory over a long gateway run: keel in front of the shared nginx upstream, wrk at 64
# connections for SOAK_MINUTES (default 10), keel's RSS sampled every 30 s. Flat RSS after
# warm-up means no growth per request. Needs $KEEL (default build-bench/keel), nginx, wrk.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
shared=${SHARED:-$root/../shared/bench}
KEEL=${KEEL:-$root/build-bench/keel}
MINUTES=${SOAK_MINUTES:-10}
UP_PORT=${UP_PORT:-18081}
tmp=$(mktemp -d /tmp/keel-soak.XXXXXX)
cleanup() {
  [ -n "${WRK_PID:-}" ] && kill "$WRK_PID" 2>/dev/null || true
  [ -n "${KEEL_PID:-}" ] && kill "$KEEL_PID" 2>/dev/null || true
  [ -f "$tmp/nginx/nginx.pid" ] && kill "$(cat "$tmp/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
mkdir -p "$tmp/nginx/logs" "$tmp/nginx/tmp"
sed "s/127.0.0.1:18080/127.0.0.1:${UP_PORT}/" "$shared/upstream-nginx.conf" > "$tmp/nginx/nginx.conf"
nginx -p "$tmp/nginx/" -c "$tmp/nginx/nginx.conf"
cat > "$tmp/keel.yaml" <<YAML
storage: sqlite://$tmp/keel.db
engine: {workers: 0}
server: {handler_threads: 128}
providers:
  up: {type: openai, base_url: http://127.0.0.1:${UP_PORT}/v1, model: gpt-4o-mini}
routes:
  gpt-4o-mini: {targets: [{provider: up}]}
YAML
"$KEEL" serve --config "$tmp/keel.yaml" --listen 127.0.0.1:0 2> "$tmp/keel.log" &
KEEL_PID=$!
port=""
for _ in $(seq 1 100); do
  port=$(grep -o '"addr":"127.0.0.1:[0-9]*"' "$tmp/keel.log" | head -1 | grep -o '[0-9]*"$' | tr -d '"' || true)
  [ -n "$port" ] && break
  sleep 0.05
done
BODY_FILE="$shared/chat-body.json" wrk -t1 -c64 -d"${MINUTES}m" -s "$here/chat_post.lua" \
  "http://127.0.0.1:$port/v1/chat/completions" > "$tmp/wrk.out" &
WRK_PID=$!
printf 'keel soak: %s min at 64 connections; RSS of keel serve every 30 s\n' "$MINUTES"
start=$(date +%s)
while kill -0 "$WRK_PID" 2>/dev/null; do
  printf '  t=%4ss  RSS %s\n' $(( $(date +%s) - start )) "$(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' /proc/$KEEL_PID/status)"
  sleep 30
done
grep WRK_RESULT "$tmp/wrk.out" || true
