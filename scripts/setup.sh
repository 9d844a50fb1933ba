#!/usr/bin/env bash
# Installs every Debian package keel needs to build, test and benchmark. Idempotent; runs
# as root (or through sudo) on a fresh Debian 12 after `apt-get update`.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libboost1.81-dev            # Asio, Beast, JSON, URL (header-only use)
  libsqlite3-dev sqlite3      # the embedded store
  libyaml-cpp-dev             # keel.yaml
  libcli11-dev                # subcommands and flags
  libspdlog-dev libfmt-dev    # JSON log lines
  libcurl4-openssl-dev        # outbound HTTP (TLS, proxies)
  libssl-dev                  # SHA-256 of request bodies
  prometheus-cpp-dev          # metrics registry and text format
  libgtest-dev libgmock-dev   # tests
  json-schema-test-suite      # the official JSON Schema test suite (core/json_schema_test.cc)
  libbenchmark-dev wrk curl   # benchmarks
  nginx-light                 # the static upstream of bench/run_gateway.sh
  python3                     # examples/worker.py and its tests
  libpq-dev                   # the PostgreSQL store (libpq)
  postgresql                  # a PostgreSQL server for the tests and benchmarks
  libhiredis-dev              # shared rate-limit counters and cache on Redis
  redis-server                # a Redis server for the tests
  clang-14 libclang-rt-14-dev time  # the fuzz targets: clang, libFuzzer, CPU times (scripts/fuzz.sh)
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
else
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The official OpenAI SDK for Node, pinned by tests/sdk/package-lock.json.
sdk="$(cd "$(dirname "$0")/.." && pwd)/tests/sdk"
if [ ! -d "$sdk/node_modules/openai" ]; then
  if ! command -v npm >/dev/null; then  # the machine image ships Node.js with npm; else Debian's
    $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  echo "setup: installing the OpenAI SDK for the compatibility test"
  (cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
echo "setup: done"
