#!/usr/bin/env bash
# Configures and builds keel into ${BUILD_DIR:-build} (RelWithDebInfo, ccache, ninja).
# Extra arguments go to cmake, e.g. -DKEEL_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" -G Ninja "$@" >/dev/null
ninja -C "$BUILD_DIR" -j "$(nproc)"
