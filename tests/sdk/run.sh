#!/usr/bin/env bash
# Starts `keel serve` (default config) on a free loopback port and runs the OpenAI SDK
# checks against it. Usage: run.sh KEEL_BINARY. Exits 77 (CTest: skipped) only when
# node_modules is missing, which scripts/setup.sh installs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
keel=$1
if [ ! -d "$here/node_modules/openai" ]; then
  echo "openai SDK not installed (run scripts/setup.sh); skipped"
  exit 77
fi
tmp=$(mktemp -d /tmp/keel-sdk.XXXXXX)
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null
  [ -n "${mock_pid:-}" ] && kill "$mock_pid" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"
# The port a process logged in its "listening" line ($1: its log, $2: its pid).
port_of() {
  local port=""
  for _ in $(seq 1 200); do
    port=$(grep -o '"addr":"127.0.0.1:[0-9]*"' "$1" | head -1 | grep -o '[0-9]*"$' | tr -d '"' || true)
    [ -n "$port" ] && break
    kill -0 "$2" 2>/dev/null || { cat "$1" >&2; return 1; }
    sleep 0.05
  done
  echo "$port"
}
"$keel" serve --listen 127.0.0.1:0 2> keel.log &
pid=$!
port=$(port_of keel.log "$pid")
# A `keel mock-llm` beside it: the same mock behaviour as keel's built-in provider, called
# directly, so the test can compare what the SDK decodes with what the mock computes.
"$keel" mock-llm --listen 127.0.0.1:0 2> mock.log &
mock_pid=$!
mock_port=$(port_of mock.log "$mock_pid")
node "$here/openai_sdk_test.mjs" "http://127.0.0.1:$port" "http://127.0.0.1:$mock_port"
