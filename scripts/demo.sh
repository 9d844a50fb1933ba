#!/usr/bin/env bash
# Sets up, builds and runs keel: `keel serve` on the embedded default (SQLite under
# ./keel-data, the built-in mock provider, the example pipelines), submits a demo run,
# shows it finish, and keeps serving until Ctrl-C. With KEEL_DEMO_EXIT=1 it stops after
# the demo run (used by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
KEEL=./build/keel
PORT="${KEEL_PORT:-7420}"
export KEEL_URL="http://127.0.0.1:${PORT}"

$KEEL serve --listen "127.0.0.1:${PORT}" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 100); do
  curl -fsS "$KEEL_URL/readyz" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "demo: keel serve exited" >&2; exit 1; }
  sleep 0.1
done

echo
echo "demo: submitting a run of the 'summarize' pipeline (llm -> llm -> transform)"
$KEEL run summarize --input '{"text": "keel keeps AI pipelines running when their dependencies fail."}' --wait \
  | python3 -m json.tool
echo
echo "demo: keel is serving at $KEEL_URL (try: ./build/keel runs list, curl $KEEL_URL/metrics)"
if [ "${KEEL_DEMO_EXIT:-0}" = "1" ]; then exit 0; fi
echo "demo: Ctrl-C to stop"
wait $SERVER
