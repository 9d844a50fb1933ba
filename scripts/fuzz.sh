#!/usr/bin/env bash
# Builds keel's libFuzzer targets (fuzz/, docs/fuzzing.md) with clang into build-fuzz and
# runs each for FUZZ_SECONDS seconds on a scratch copy of its seed corpus, then prints a
# table of target, seconds, executions and crashes. Fails when any target crashed,
# leaked, timed out or ran out of memory; the input that did it is kept in
# ${FUZZ_OUT}/<target>/artifacts/ (crash-*, leak-*, timeout-*, oom-*). "seconds" is wall
# time, "cpu_s" the CPU time (user + system) the target used, server threads included.
#
#   FUZZ_SECONDS=600   seconds per target (the long form; CI runs FUZZ_SECONDS=20)
#   FUZZ_TARGETS="..." the targets to run (default: all of fuzz/*_fuzz.cc)
#   FUZZ_PARALLEL=1    targets run at once (each uses one core)
#   FUZZ_OUT=build-fuzz/fuzz-out   scratch corpora, logs and crash inputs
#   FUZZ_NO_BUILD=1    run the binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
BUILD_DIR="${FUZZ_BUILD_DIR:-build-fuzz}"
SECONDS_EACH="${FUZZ_SECONDS:-600}"
PARALLEL="${FUZZ_PARALLEL:-1}"
OUT="${FUZZ_OUT:-$BUILD_DIR/fuzz-out}"
ALL_TARGETS=$(cd fuzz && ls ./*_fuzz.cc | sed 's|^\./||; s|\.cc$||')
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"

CXX_CLANG="${FUZZ_CXX:-$(command -v clang++-14 || command -v clang++ || true)}"
if [ -z "$CXX_CLANG" ]; then
  echo "fuzz.sh: clang++ not found; run ./scripts/setup.sh (it installs clang-14 and libclang-rt-14-dev)" >&2
  exit 2
fi

if [ "${FUZZ_NO_BUILD:-0}" != "1" ]; then
  # Only the fuzz targets and the layers they link; no tests, no benchmarks. -Werror is
  # for the g++ build: clang's warnings are not the gate here.
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_CXX_COMPILER="$CXX_CLANG" -DKEEL_FUZZ=ON -DKEEL_WERROR=OFF \
    -DKEEL_BUILD_TESTS=OFF -DKEEL_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  # shellcheck disable=SC2086
  ninja -C "$BUILD_DIR" -j "$(nproc)" $TARGETS
fi

# Dictionaries: fuzz/<target>.dict, else the shared one the target's inputs are made of.
dict_for() {
  case "$1" in
    json_body_fuzz|api_fuzz|template_fuzz|store_record_fuzz) echo fuzz/json.dict ;;
    json_schema_fuzz) echo fuzz/json_schema.dict ;;
    condition_fuzz) echo fuzz/condition.dict ;;
    config_fuzz) echo fuzz/config.dict ;;
    http_request_fuzz) echo fuzz/http.dict ;;
    sse_fuzz) echo fuzz/sse.dict ;;
  esac
}

rm -rf "$OUT"
mkdir -p "$OUT"
# Scratch space of the targets that open a store (api_fuzz, store_record_fuzz): this
# run's own, in memory when /dev/shm exists.
KEEL_FUZZ_TMP="$(mktemp -d "$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp )/keel-fuzz-XXXXXX")"
export KEEL_FUZZ_TMP
run_one() {
  local t="$1" dir="$OUT/$1"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  cp fuzz/corpus/"$t"/* "$dir/corpus/" 2>/dev/null || true
  local dict
  dict="$(dict_for "$t")"
  local args=(-max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -max_len=16384
              -print_final_stats=1 -artifact_prefix="$dir/artifacts/")
  [ -n "$dict" ] && args+=(-dict="$dict")
  local start end rc=0
  start=$(date +%s)
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
    /usr/bin/time -f '%U %S' -o "$dir/cpu" "$BUILD_DIR/fuzz/$t" "${args[@]}" "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
  end=$(date +%s)
  local execs crashes cpu
  cpu=$(tail -1 "$dir/cpu" 2>/dev/null | awk '{printf "%d", $1 + $2}')
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
  crashes=$(find "$dir/artifacts" -type f | wc -l)
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi  # died without an artifact
  echo "$t $((end - start)) ${cpu:-?} ${execs:-?} $crashes $rc" >"$dir/result"
}

running=0
for t in $TARGETS; do
  if [ ! -x "$BUILD_DIR/fuzz/$t" ]; then echo "fuzz.sh: no target $t (built into $BUILD_DIR/fuzz?)" >&2; exit 2; fi
  echo "fuzz.sh: $t for ${SECONDS_EACH}s"
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n || true; running=$((running - 1)); fi
done
wait || true
rm -rf "$KEEL_FUZZ_TMP"

failed=0
printf '\n%-20s %8s %8s %12s %8s\n' target seconds cpu_s executions crashes
for t in $TARGETS; do
  read -r name secs cpu execs crashes rc <"$OUT/$t/result"
  printf '%-20s %8s %8s %12s %8s\n' "$name" "$secs" "$cpu" "$execs" "$crashes"
  if [ "$crashes" -ne 0 ]; then
    failed=1
    echo "  $name: log $OUT/$t/log; inputs: $(find "$OUT/$t/artifacts" -type f | tr '\n' ' ')" >&2
    grep -m 12 -E 'ERROR: |SUMMARY: |fuzz property failed|runtime error|#[0-9]+ 0x' "$OUT/$t/log" | head -12 >&2 || true
  fi
done
exit "$failed"
