#!/usr/bin/env bash
# Sets up, builds and runs the whole test suite: unit tests, the Store conformance suite
# and the integration tests (real keel processes on loopback). With --sanitize, the same
# suite is also built and run under AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
SANITIZE=0
for a in "$@"; do
  case "$a" in
    --sanitize) SANITIZE=1 ;;
    *) echo "test.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

./scripts/build.sh -DKEEL_BUILD_BENCH=OFF
ctest --test-dir build --output-on-failure -j "$(nproc)" --timeout 180

if [ "$SANITIZE" = "1" ]; then
  BUILD_DIR=build-asan ./scripts/build.sh -DKEEL_SANITIZE=ON -DKEEL_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=Debug
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j "$(nproc)" --timeout 300
fi
