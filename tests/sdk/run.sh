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
cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
cd "$tmp"
"$keel" serve --listen 127.0.0.1:0 2> keel.log &
pid=$!
port=""
for _ in $(seq 1 200); do
  port=$(grep -o '"addr":"127.0.0.1:[0-9]*"' keel.log | head -1 | grep -o '[0-9]*"$' | tr -d '"' || true)
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { cat keel.log; exit 1; }
  sleep 0.05
done
node "$here/openai_sdk_test.mjs" "http://127.0.0.1:$port"
