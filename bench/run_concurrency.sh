#!/usr/bin/env bash
# keel at REAL upstream latency, side by side with the same load sent straight to the
# upstream, in one run (issue 11, "Performance"). The upstream is `keel mock-llm
# --latency-ms N` (every answer after N ms, on a timer); wrk holds C connections open,
# each sending its next request when the previous answer is complete. A gateway that holds
# no thread per call should serve C / latency requests per second, as the upstream alone
# does; one that holds a thread per call serves threads / latency. A benchmark, not a
# test: it prints a table; it exits non-zero only when the measurement itself is invalid
# (a process died, keel refused a config this script cannot recover from, runs were lost,
# submits were refused).
#
#   bench/run_concurrency.sh                              # everything, defaults below
#   QUICK=1 bench/run_concurrency.sh                      # smoke check, < 3 minutes
#   REPEAT=3 bench/run_concurrency.sh                     # three rounds, medians
#   SCENARIOS="stream" CONNECTIONS="1000" bench/run_concurrency.sh
#
# Builds nothing, installs nothing: needs $KEEL (default build-bench/keel, a Release
# build), wrk (with its LuaJIT), curl; nginx and openssl for the TLS rows; jq (optional)
# to prove that no prompt reached the mock twice. The wrk script is
# bench/chat_concurrency.lua. Raises `ulimit -n` (soft) towards the hard limit as the
# connection counts need (about 2 x the largest count + 1024 descriptors per process).
#
# Scenarios (SCENARIOS, any of: chat stream tls pipeline):
#   chat      non-streamed POST /v1/chat/completions, upstream `keel mock-llm
#             --latency-ms LATENCY_MS`, at each count in CONNECTIONS.
#   stream    the same with "stream": true (server-sent events; wrk's latency is the
#             time to the end of the stream, and a 2xx stream without `data: [DONE]`
#             counts as incomplete).
#   tls       both of the above over TLS (only when TLS=1): nginx with a self-signed ECDSA
#             certificate for 127.0.0.1/localhost (SAN), generated with openssl into the
#             temp dir, proxying to the same mock (keep-alive upstream, no buffering).
#             Direct: wrk to nginx over https. Through keel: wrk -> keel over http, keel
#             -> nginx over https with `tls: {ca_file: CERT}` in the provider (certificate
#             verification stays on). A keel that does not know that setting is detected
#             with `keel config check FILE` (this keel's CLI takes the file as a positional
#             argument, not --config) and its rows print "not supported by this keel:
#             <its message>" beside the direct figures, instead of failing.
#   pipeline  RUNS runs of bench3 (llm -> llm -> transform, bench3_yaml in bench/lib.sh)
#             against a mock with --latency-ms PIPELINE_LATENCY_MS, all submitted at once
#             (one curl process, --parallel, SUBMIT_PARALLEL transfers at a time),
#             `engine.workers: WORKERS`. When keel refuses that value ("must be between 0
#             and MAX"), the script retries with MAX and says so.
#
# Every gateway row starts a fresh `keel serve` (API only, engine.workers 0), so its
# thread count and RSS are that row's own; the mock (and nginx) serve every row. Within a
# round the direct run of a row goes first, then the same load through keel.
#
# Parameters (environment):
#   KEEL                 keel binary                                  default: <repo>/build-bench/keel
#   QUICK=1              smoke check: CONNECTIONS="200", RUNS=500, DURATION=8s unless set
#   SCENARIOS            which scenarios, in this order               default: "chat stream tls pipeline"
#   LATENCY_MS           the gateway rows' upstream latency (ms)      default: 2000
#   CONNECTIONS          wrk connection counts, one row each          default: "1000 5000"
#   DURATION             wrk duration per run (wrk syntax)            default: 20s
#   WRK_THREADS          wrk threads                                  default: 2
#   WRK_TIMEOUT          wrk --timeout: an answer later than this is a socket error  default: 30s
#   TLS                  1: run the TLS rows                          default: 1 if nginx and openssl exist
#   HANDLER_THREADS      server.handler_threads of keel               default: unset (keel's default)
#   IO_THREADS           server.io_threads of keel                    default: unset (keel's default)
#   MOCK_IO_THREADS      --io-threads of the mocks                    default: unset (the mock's default)
#   RUNS                 pipeline runs submitted at once              default: 5000
#   PIPELINE_LATENCY_MS  the pipeline mock's latency (ms)             default: 500
#   WORKERS              engine.workers for the pipeline              default: 2000
#   SUBMIT_PARALLEL      curl --parallel-max for the submits (<= 300) default: 256
#   DRAIN_TIMEOUT        seconds the pipeline runs may take to end    default: 300
#   REPEAT               rounds (every row and the pipeline each round); > 1 prints medians
#                                                                     default: 1
#   SAMPLE_INTERVAL      seconds between two readings of keel's /proc/PID/status  default: 0.2
#   KEEP_TMP=1           keep the temp dir (configs, logs, wrk output) for inspection
#
# Figures, gateway rows (each a row of the table):
#   direct r/s      whole 2xx answers per second straight to the upstream (wrk's answers
#                   minus non-2xx and incomplete ones, over wrk's duration)
#   keel r/s        the same through keel
#   keel/direct     keel r/s / direct r/s, in % (issue 11's goal: >= 95 %)
#   p50/p99         wrk latency percentiles, direct and through keel, ms (of the answers
#                   that arrived; requests still waiting when the run ends are not in them)
#   +p99            keel's p99 - direct p99, ms (goal: < 50)
#   errors          non-2xx / socket errors (connect, read, write, timeouts) / incomplete
#                   2xx bodies, direct and through keel
#   threads         keel's Threads (/proc/PID/status) at the peak of the load (the highest
#                   reading, every SAMPLE_INTERVAL s), and after start-up (idle) in brackets
#   RSS             keel's peak RSS during the row (VmHWM of that row's fresh process), MiB
#                   (goal: < 150 MiB at 5,000 streams)
# Figures, pipeline:
#   runs/s          runs succeeded / (last success seen - first submit), /metrics
#                   (keel_runs_finished_total{status="succeeded"}) read every 0.1 s
#   bound           WORKERS / (2 x PIPELINE_LATENCY_MS / 1000) runs/s (two model calls per
#                   run in sequence; the bound of the workers keel ran with too, when it
#                   capped them), and the ratio of runs/s to it (issue 11's goal: >= 80 %,
#                   1,600 of 2,000). With RUNS < WORKERS the bound cannot be reached.
#   submit          answers 201 / other / socket errors; submit p50 / p99 (curl's
#                   time_total per request) and the time to submit all
#   lost / failed   runs not succeeded by DRAIN_TIMEOUT; runs failed, dead-lettered or
#                   cancelled (both must be 0)
#   mock calls      calls the mock saw (GET /mock/stats, after a reset past the smoke run):
#                   must be 2 x RUNS; and the most calls one prompt got (must be 1)
#   threads / RSS   keel's peak Threads and peak RSS (VmHWM) during the runs
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
KEEL=${KEEL:-$root/build-bench/keel}
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  CONNECTIONS=${CONNECTIONS:-200}
  RUNS=${RUNS:-500}
  DURATION=${DURATION:-8s}
fi
SCENARIOS=${SCENARIOS:-chat stream tls pipeline}
LATENCY_MS=${LATENCY_MS:-2000}
CONNECTIONS=${CONNECTIONS:-1000 5000}
DURATION=${DURATION:-20s}
WRK_THREADS=${WRK_THREADS:-2}
WRK_TIMEOUT=${WRK_TIMEOUT:-30s}
if command -v nginx >/dev/null && command -v openssl >/dev/null; then TLS=${TLS:-1}; else TLS=${TLS:-0}; fi
HANDLER_THREADS=${HANDLER_THREADS:-}
IO_THREADS=${IO_THREADS:-}
MOCK_IO_THREADS=${MOCK_IO_THREADS:-}
RUNS=${RUNS:-5000}
PIPELINE_LATENCY_MS=${PIPELINE_LATENCY_MS:-500}
WORKERS=${WORKERS:-2000}
SUBMIT_PARALLEL=${SUBMIT_PARALLEL:-256}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}
REPEAT=${REPEAT:-1}
SAMPLE_INTERVAL=${SAMPLE_INTERVAL:-0.2}
KEEP_TMP=${KEEP_TMP:-0}

die() { echo "run_concurrency: $*" >&2; exit 1; }
[[ -x $KEEL ]] || die "no keel binary at $KEEL (build it, or set KEEL)"
command -v wrk >/dev/null || die "wrk not found"
command -v curl >/dev/null || die "curl not found"
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
for s in $SCENARIOS; do [[ $s =~ ^(chat|stream|tls|pipeline)$ ]] || die "unknown scenario \"$s\" in SCENARIOS"; done
if has tls && [[ $TLS == 1 ]]; then
  command -v nginx >/dev/null || die "TLS=1 needs nginx"
  command -v openssl >/dev/null || die "TLS=1 needs openssl"
fi
((REPEAT >= 1)) || die "REPEAT must be >= 1"
((SUBMIT_PARALLEL >= 1 && SUBMIT_PARALLEL <= 300)) || die "SUBMIT_PARALLEL must be 1..300 (curl's --parallel-max)"
max_conns=0
for c in $CONNECTIONS; do
  [[ $c =~ ^[0-9]+$ ]] && ((c >= WRK_THREADS)) || die "bad connection count \"$c\" (must be >= WRK_THREADS)"
  ((c > max_conns)) && max_conns=$c
done

# Descriptors: keel holds a client and an upstream connection per request in flight, nginx
# the same per worker, the mock and wrk one each; plus files, the database, slack.
need_fds=$(( 2 * (max_conns > SUBMIT_PARALLEL ? max_conns : SUBMIT_PARALLEL) + 1024 ))
hard_fds=$(ulimit -Hn)
if [[ $hard_fds != unlimited ]] && ((hard_fds < need_fds)); then
  die "ulimit -Hn is $hard_fds; $max_conns connections need about $need_fds descriptors per process"
fi
if [[ $(ulimit -n) != unlimited ]] && (($(ulimit -n) < need_fds)); then ulimit -n "$need_fds"; fi
# keel's connection limits: the largest count, one client address, plus room for probes.
keel_max_conns=$(( max_conns + 1024 > 65536 ? 65536 : max_conns + 1024 ))

source "$here/lib.sh"
bench_init conc
mkdir -p "$tmp/res"
cd "$tmp"

# --- helpers ------------------------------------------------------------------------------
# val LINE KEY: the value of KEY=VALUE in LINE.
val() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }
# wv FILE KEY: the value of KEY in FILE's WRK_RESULT line.
wv() { val "$(grep '^WRK_RESULT' "$1")" "$2"; }
ms() { calc %.1f "$1 / 1000"; }
mib() { calc %.1f "$1 / 1024"; }

# alive PID NAME LOG: dies (with the log's tail) when that process is gone.
alive() {
  kill -0 "$1" 2>/dev/null && return 0
  [[ -f ${3:-} ]] && tail -20 "$3" >&2
  die "$2 (pid $1) died"
}

# config_check FILE: keel config check; sets check_rc and check_msg.
config_check() {
  check_rc=0
  check_msg=$("$KEEL" config check "$1" 2>&1) || check_rc=$?
  check_msg=$(tr '\n' ' ' <<<"$check_msg" | sed 's/ *$//')
  check_msg=${check_msg#"$1: "}  # "FILE: line N: ..." -> "line N: ..."
}

# sampler PID OUT: every SAMPLE_INTERVAL s, writes "MAX_THREADS MAX_RSS_KB" seen so far
# for PID to OUT, until PID is gone or the sampler is stopped.
sampler() {
  trap - EXIT INT TERM
  local pid=$1 out=$2 t=0 r=0 k v _
  while [[ -r /proc/$pid/status ]]; do
    while read -r k v _; do
      case $k in
        Threads:) if ((v > t)); then t=$v; fi ;;
        VmRSS:) if ((v > r)); then r=$v; fi ;;
      esac
    done <"/proc/$pid/status" 2>/dev/null || true
    echo "$t $r" >"$out.new" && mv -f "$out.new" "$out"
    sleep "$SAMPLE_INTERVAL"
  done
}
start_sampler() {  # PID OUT -> sampler_pid
  echo "0 0" >"$2"
  sampler "$1" "$2" &
  sampler_pid=$!
  pids+=("$sampler_pid")
}
stop_sampler() { stop_pids "$sampler_pid"; forget_pids "$sampler_pid"; }

threads_of() { awk '$1 == "Threads:" {print $2}' "/proc/$1/status"; }

# start_mock LATENCY LOG -> mock_pid, mock_addr_out
start_mock() {
  "$KEEL" mock-llm --listen 127.0.0.1:0 --latency-ms "$1" --max-connections $((2 * max_conns + 1024)) ${MOCK_IO_THREADS:+--io-threads "$MOCK_IO_THREADS"} 2>"$2" &
  mock_pid_out=$!
  pids+=("$mock_pid_out")
  mock_addr_out=$(wait_listening "$2" "$mock_pid_out")
}

# start_keel CONFIG LOG -> keel_pid, keel_addr
start_keel() {
  "$KEEL" serve --config "$1" --listen 127.0.0.1:0 2>"$2" &
  keel_pid=$!
  pids+=("$keel_pid")
  keel_addr=$(wait_listening "$2" "$keel_pid")
}
stop_keel() { stop_pids "$keel_pid"; forget_pids "$keel_pid"; }

server_yaml() {
  echo "server: {max_connections: $keel_max_conns, max_connections_per_ip: $keel_max_conns${HANDLER_THREADS:+, handler_threads: $HANDLER_THREADS}${IO_THREADS:+, io_threads: $IO_THREADS}}"
}

# The chat bodies: the same request direct and through keel (the route is named "bench";
# the mock answers any model name). Several sentences, so that a stream has ~40 events.
prompt="What is the capital of France, and why has it been the political and cultural center of the country for so long? Please keep it short, two sentences at most, and never invent facts."
for s in false true; do
  printf '{"model":"bench","messages":[{"role":"system","content":"You are a concise assistant for a geography quiz application."},{"role":"user","content":"%s"}],"temperature":0.2,"max_tokens":128,"stream":%s}' \
    "$prompt" "$s" >"$tmp/body-$s.json"
done

# smoke URL STREAM CACERT: one request; dies unless it is a whole 2xx answer.
smoke() {
  local url=$1 stream=$2 want='"choices"' code
  [[ $stream == true ]] && want='data: [DONE]'
  code=$(curl -sS -o "$tmp/smoke.out" -w '%{http_code}' --max-time $((LATENCY_MS / 1000 + 60)) \
    ${3:+--cacert "$3"} -H 'Content-Type: application/json' --data-binary "@$tmp/body-$stream.json" \
    "$url/v1/chat/completions") || code=000
  [[ $code == 2* ]] && grep -qF "$want" "$tmp/smoke.out" && return 0
  head -c 600 "$tmp/smoke.out" >&2 || true
  echo >&2
  return 1
}

# wrk_run URL STREAM CONNS OUT
wrk_run() {
  local s=0
  [[ $2 == true ]] && s=1
  BODY_FILE="$tmp/body-$2.json" STREAM=$s wrk -t"$WRK_THREADS" -c"$3" -d"$DURATION" --timeout "$WRK_TIMEOUT" \
    -s "$here/chat_concurrency.lua" "$1/v1/chat/completions" >"$4" 2>&1 &
  local w=$!
  pids+=("$w")
  wait "$w" || { cat "$4" >&2; die "wrk failed ($4)"; }
  forget_pids "$w"
  grep -q '^WRK_RESULT' "$4" || { cat "$4" >&2; die "no WRK_RESULT line in $4"; }
}
good_rps() {  # wrk output -> whole 2xx answers per second
  calc %.1f "($(wv "$1" requests) - $(wv "$1" non2xx) - $(wv "$1" incomplete)) / ($(wv "$1" duration_us) / 1e6)"
}
errs() { echo "$(wv "$1" non2xx)/$(wv "$1" sock)/$(wv "$1" incomplete)"; }

# --- the upstreams ----------------------------------------------------------------------------
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
if has chat || has stream || has tls; then
  start_mock "$LATENCY_MS" "$tmp/mock.log"
  gw_mock_pid=$mock_pid_out
  gw_mock_addr=$mock_addr_out
  smoke "http://$gw_mock_addr" false || die "the mock did not answer a chat completion"
  smoke "http://$gw_mock_addr" true || die "the mock did not answer a streamed chat completion"
fi

tls_supported=0
tls_msg=""
if has tls && [[ $TLS == 1 ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj "/CN=localhost" \
    -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$tmp/openssl.log" 2>&1 ||
    { cat "$tmp/openssl.log" >&2; die "openssl could not make the certificate"; }
  mkdir -p "$tmp/nginx/logs" "$tmp/nginx/tmp"
  ng_conns=$(( 2 * max_conns + 1024 ))
  ng_pid=""
  ng_user=""
  [[ $(id -u) == 0 ]] && ng_user="user root;"  # workers must read the temp dir (mode 700)
  for _ in $(seq 10); do
    # A port below the ephemeral range, free now (nginx cannot listen on port 0).
    ng_port=$(( 20000 + RANDOM % 12000 ))
    [[ -n $(ss -Hltn "sport = :$ng_port" 2>/dev/null) ]] && continue
    cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes 2;
worker_rlimit_nofile $need_fds;
daemon off;
pid nginx.pid;
error_log logs/error.log warn;
$ng_user
events {
    worker_connections $ng_conns;
    multi_accept on;
}
http {
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_buffer_size 64k;
    upstream mock {
        server $gw_mock_addr;
        keepalive $ng_conns;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$ng_port ssl backlog=4096;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }
    }
}
EOF
    nginx -p "$tmp/nginx/" -c "$tmp/nginx/nginx.conf" -e logs/error.log 2>"$tmp/nginx/stderr.log" &
    ng_pid=$!
    pids+=("$ng_pid")
    for _ in $(seq 50); do
      kill -0 "$ng_pid" 2>/dev/null || break
      curl -s -o /dev/null --max-time 1 --cacert "$tmp/cert.pem" "https://127.0.0.1:$ng_port/" && break
      sleep 0.1
    done
    kill -0 "$ng_pid" 2>/dev/null && break
    wait "$ng_pid" 2>/dev/null || true
    forget_pids "$ng_pid"
    ng_pid=""
    grep -q 'Address already in use' "$tmp/nginx/logs/error.log" "$tmp/nginx/stderr.log" 2>/dev/null ||
      { cat "$tmp/nginx/stderr.log" "$tmp/nginx/logs/error.log" >&2 2>/dev/null; die "nginx did not start"; }
  done
  [[ -n $ng_pid ]] || die "nginx found no free port"
  tls_url="https://127.0.0.1:$ng_port"
  # curl verifies the certificate (SAN 127.0.0.1), as keel must.
  smoke "$tls_url" false "$tmp/cert.pem" || die "nginx (TLS) did not answer a chat completion"
  smoke "$tls_url" true "$tmp/cert.pem" || die "nginx (TLS) did not answer a streamed chat completion"

  # Does this keel know a provider's `tls: {ca_file}`?
  cat >"$tmp/tls-check.yaml" <<EOF
listen: 127.0.0.1:0
storage: sqlite://$tmp/tls-check/keel.db
engine: {workers: 0}
$(server_yaml)
providers:
  up: {type: openai, base_url: "$tls_url/v1", model: mock-1, tls: {ca_file: "$tmp/cert.pem"}}
routes:
  bench: {targets: [{provider: up}]}
EOF
  config_check "$tmp/tls-check.yaml"
  if ((check_rc == 0)); then
    tls_supported=1
  elif [[ $check_msg == *tls* ]]; then
    tls_msg=$check_msg
  else
    die "keel config check refused the TLS config for another reason: $check_msg"
  fi
fi

# --- gateway rows ---------------------------------------------------------------------------
# gw_row KEY KIND(chat|stream) TRANSPORT(http|tls) CONNS: one round of one row; appends a
# result line to $tmp/res/KEY.
gw_row() {
  local key=$1 kind=$2 transport=$3 conns=$4 stream=false url cacert="" dir
  [[ $kind == stream ]] && stream=true
  dir="$tmp/$key.r$round"
  mkdir -p "$dir"
  if [[ $transport == tls ]]; then url=$tls_url; cacert="$tmp/cert.pem"; else url="http://$gw_mock_addr"; fi

  wrk_run "$url" "$stream" "$conns" "$dir/direct.out"
  alive "$gw_mock_pid" "the mock" "$tmp/mock.log"
  [[ $transport == tls ]] && alive "$ng_pid" nginx "$tmp/nginx/logs/error.log"
  local line
  line="d_rps=$(good_rps "$dir/direct.out") d_p50=$(ms "$(wv "$dir/direct.out" p50_us)") d_p99=$(ms "$(wv "$dir/direct.out" p99_us)") d_err=$(errs "$dir/direct.out")"

  if [[ $transport == tls && $tls_supported != 1 ]]; then
    echo "$line keel=na" >>"$tmp/res/$key"
    echo "round $round: $key: direct $(val "$line" d_rps) req/s; through keel: not supported" >&2
    return 0
  fi

  {
    echo "listen: 127.0.0.1:0"
    echo "storage: sqlite://$dir/data/keel.db"
    echo "log_level: info"
    echo "engine: {workers: 0}"
    server_yaml
    echo "providers:"
    local tls_yaml=""
    [[ -n $cacert ]] && tls_yaml=", tls: {ca_file: \"$cacert\"}"
    echo "  up: {type: openai, base_url: \"$url/v1\", model: mock-1$tls_yaml}"
    echo "routes:"
    echo "  bench: {targets: [{provider: up}]}"
  } >"$dir/keel.yaml"
  start_keel "$dir/keel.yaml" "$dir/keel.log"
  smoke "http://$keel_addr" "$stream" || { tail -20 "$dir/keel.log" >&2; die "keel did not answer the smoke request ($key)"; }
  local idle_threads
  idle_threads=$(threads_of "$keel_pid")
  start_sampler "$keel_pid" "$dir/sample"
  wrk_run "http://$keel_addr" "$stream" "$conns" "$dir/keel.out"
  alive "$keel_pid" "keel serve" "$dir/keel.log"
  local hwm peak
  hwm=$(hwm_kb "$keel_pid")
  stop_sampler
  read -r peak _ <"$dir/sample"
  stop_keel
  alive "$gw_mock_pid" "the mock" "$tmp/mock.log"
  local k_rps d_rps k_p99 d_p99
  d_rps=$(val "$line" d_rps); d_p99=$(val "$line" d_p99)
  k_rps=$(good_rps "$dir/keel.out"); k_p99=$(ms "$(wv "$dir/keel.out" p99_us)")
  line="$line keel=1 k_rps=$k_rps k_p50=$(ms "$(wv "$dir/keel.out" p50_us)") k_p99=$k_p99"
  line="$line ratio=$(calc %.1f "($d_rps > 0) ? 100 * $k_rps / $d_rps : 0") added=$(calc %.1f "$k_p99 - $d_p99")"
  line="$line k_err=$(errs "$dir/keel.out") threads=$peak idle_threads=$idle_threads rss=$(mib "$hwm")"
  echo "$line" >>"$tmp/res/$key"
  echo "round $round: $key: $line" >&2
}

# --- pipeline -------------------------------------------------------------------------------
workers_eff=$WORKERS
workers_note=""
pipeline_config() {  # WORKERS DIR MOCK_ADDR -> DIR/keel.yaml
  # shellcheck disable=SC2034  # read by bench3_yaml
  local mock_addr=$3
  {
    echo "listen: 127.0.0.1:0"
    echo "storage: sqlite://$2/data/keel.db"
    echo "log_level: info"
    echo "engine: {workers: $1}"
    server_yaml
    bench3_yaml
  } >"$2/keel.yaml"
}
if has pipeline; then
  mkdir -p "$tmp/pipe-check"
  pipeline_config "$WORKERS" "$tmp/pipe-check" 127.0.0.1:9
  config_check "$tmp/pipe-check/keel.yaml"
  if ((check_rc != 0)); then
    cap=$(sed -n 's/.*engine\.workers must be between [0-9]* and \([0-9]*\).*/\1/p' <<<"$check_msg")
    [[ -n $cap ]] || die "keel refused the pipeline config: $check_msg"
    workers_eff=$cap
    workers_note="engine.workers: $WORKERS refused (\"$check_msg\"); ran with $cap"
    pipeline_config "$workers_eff" "$tmp/pipe-check" 127.0.0.1:9
    config_check "$tmp/pipe-check/keel.yaml"
    ((check_rc == 0)) || die "keel refused the pipeline config with workers $cap too: $check_msg"
    echo "run_concurrency: $workers_note" >&2
  fi
fi

scrape() { curl -sf --max-time 10 "http://$keel_addr/metrics" -o "$1" || die "GET /metrics failed"; }
succeeded() { msum "$1" keel_runs_finished_total 'status="succeeded"'; }

pipeline_round() {
  local dir="$tmp/pipeline.r$round"
  mkdir -p "$dir"
  start_mock "$PIPELINE_LATENCY_MS" "$dir/mock.log"
  local pmock_pid=$mock_pid_out pmock_addr=$mock_addr_out
  pipeline_config "$workers_eff" "$dir" "$pmock_addr"
  start_keel "$dir/keel.yaml" "$dir/keel.log"

  # One run end to end, so that a broken setup fails fast; then the mock's counts restart.
  local code
  code=$(curl -s -o "$dir/smoke.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"pipeline":"bench3","input":{"n":-1,"worker":0,"customer":"smoke","ticket":"smoke test"}}' \
    "http://$keel_addr/v1/runs") || true
  [[ $code == 201 ]] || { cat "$dir/smoke.json" >&2; die "the smoke submit answered $code"; }
  for _ in $(seq 300); do
    scrape "$dir/m0"
    [[ $(succeeded "$dir/m0") -ge 1 ]] && break
    [[ $(terminal_bad "$dir/m0") -gt 0 ]] && { tail -5 "$dir/keel.log" >&2; die "the smoke run did not succeed"; }
    sleep 0.1
  done
  [[ $(succeeded "$dir/m0") -ge 1 ]] || die "the smoke run did not finish in 30s"
  curl -sf -X POST -o /dev/null "http://$pmock_addr/mock/reset" || die "POST /mock/reset failed"

  # RUNS submits in one curl process; each line of its output: HTTP code, time_total.
  awk -v n="$RUNS" -v url="http://$keel_addr/v1/runs" 'BEGIN {
    split("The export button does nothing when I click it in Firefox on Linux.|I was charged twice for the March invoice; please refund one of them.|How do I rotate the API key of a service account without downtime?|The dashboard shows yesterday'"'"'s numbers until I reload the page twice.", t, "|")
    for (i = 1; i <= n; i++) {
      printf "url = \"%s\"\n", url
      printf "header = \"Content-Type: application/json\"\n"
      printf "data = \"{\\\"pipeline\\\":\\\"bench3\\\",\\\"input\\\":{\\\"n\\\":%d,\\\"worker\\\":0,\\\"customer\\\":\\\"acme-%d\\\",\\\"ticket\\\":\\\"%s\\\"}}\"\n", i, i % 997, t[i % 4 + 1]
      printf "output = \"/dev/null\"\n"
      printf "write-out = \"%%{http_code} %%{time_total}\\n\"\n"
      if (i < n) print "next"
    }
  }' >"$dir/submit.curl"

  scrape "$dir/m0"
  local ok0 bad0
  ok0=$(succeeded "$dir/m0")
  bad0=$(terminal_bad "$dir/m0")
  start_sampler "$keel_pid" "$dir/sample"
  local t0 t_sub="" t_last ok=0 bad=0 prev=0 target=$RUNS deadline now
  t0=$(now_ms)
  t_last=$t0
  curl -sS -Z --parallel-max "$SUBMIT_PARALLEL" --parallel-immediate -K "$dir/submit.curl" >"$dir/submit.out" 2>"$dir/submit.err" &
  local curl_pid=$!
  pids+=("$curl_pid")
  deadline=$(( t0 + DRAIN_TIMEOUT * 1000 ))
  while :; do
    if [[ -z $t_sub ]] && ! kill -0 "$curl_pid" 2>/dev/null; then
      wait "$curl_pid" 2>/dev/null || true
      forget_pids "$curl_pid"
      t_sub=$(now_ms)
      target=$(awk '$1 == 201' "$dir/submit.out" | wc -l)
    fi
    scrape "$dir/m1"
    now=$(now_ms)
    ok=$(( $(succeeded "$dir/m1") - ok0 ))
    bad=$(( $(terminal_bad "$dir/m1") - bad0 ))
    if ((ok != prev)); then t_last=$now; prev=$ok; fi
    [[ -n $t_sub ]] && ((ok + bad >= target)) && break
    alive "$keel_pid" "keel serve" "$dir/keel.log"
    alive "$pmock_pid" "the mock" "$dir/mock.log"
    ((now < deadline)) || break
    sleep 0.1
  done
  local hwm peak
  hwm=$(hwm_kb "$keel_pid")
  stop_sampler
  read -r peak _ <"$dir/sample"
  [[ -n $t_sub ]] || { stop_pids "$curl_pid"; forget_pids "$curl_pid"; t_sub=$(now_ms); }

  local n201 nother nsock sub_p50 sub_p99 mock_total max_prompt="?"
  n201=$(awk '$1 == 201' "$dir/submit.out" | wc -l)
  nsock=$(awk '$1 == "000"' "$dir/submit.out" | wc -l)
  nother=$(( $(wc -l <"$dir/submit.out") - n201 - nsock ))
  nsock=$(( nsock + RUNS - $(wc -l <"$dir/submit.out") ))  # transfers that wrote no line
  read -r sub_p50 sub_p99 < <(awk '{print $2 * 1000}' "$dir/submit.out" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) {print "0 0"; exit}
         i = int(NR * 0.5 + 0.5); j = int(NR * 0.99 + 0.5); if (i < 1) i = 1; if (j < 1) j = 1
         printf "%.1f %.1f\n", v[i], v[j]}')
  curl -sf --max-time 30 "http://$pmock_addr/mock/stats" -o "$dir/stats.json" || die "GET /mock/stats failed"
  mock_total=$(grep -o '"total":[0-9]*' "$dir/stats.json" | head -1 | cut -d: -f2)
  if command -v jq >/dev/null; then max_prompt=$(jq '[.by_prompt[]] | max // 0' "$dir/stats.json"); fi
  stop_keel
  stop_pids "$pmock_pid"; forget_pids "$pmock_pid"

  local span=$(( t_last - t0 ))
  ((span > 0)) || span=1
  local runs_s bound bound_eff
  runs_s=$(calc %.1f "$ok / ($span / 1000)")
  bound=$(calc %.1f "$WORKERS / (2 * $PIPELINE_LATENCY_MS / 1000)")
  bound_eff=$(calc %.1f "$workers_eff / (2 * $PIPELINE_LATENCY_MS / 1000)")
  local line
  line="runs_s=$runs_s span_s=$(calc %.2f "$span / 1000") bound=$bound ratio=$(calc %.1f "100 * $runs_s / $bound")"
  line="$line bound_eff=$bound_eff ratio_eff=$(calc %.1f "100 * $runs_s / $bound_eff") ok=$ok bad=$bad lost=$(( n201 - ok - bad ))"
  line="$line n201=$n201 nother=$nother nsock=$nsock sub_p50=$sub_p50 sub_p99=$sub_p99 sub_s=$(calc %.2f "($t_sub - $t0) / 1000")"
  line="$line mock_total=${mock_total:-0} max_prompt=$max_prompt threads=$peak rss=$(mib "$hwm")"
  echo "$line" >>"$tmp/res/pipeline"
  echo "round $round: pipeline: $line" >&2
}

# --- the rounds -----------------------------------------------------------------------------
rows=()
for kind in chat stream; do
  has "$kind" || continue
  for c in $CONNECTIONS; do rows+=("$kind-http-$c"); done
done
if has tls && [[ $TLS == 1 ]]; then
  for kind in chat stream; do
    for c in $CONNECTIONS; do rows+=("$kind-tls-$c"); done
  done
fi
for round in $(seq "$REPEAT"); do
  for key in "${rows[@]}"; do
    IFS=- read -r kind transport conns <<<"$key"
    gw_row "$key" "$kind" "$transport" "$conns"
  done
  if has pipeline; then pipeline_round; fi
done

# --- report ---------------------------------------------------------------------------------
# pick KEY FIELD: the median over the rounds (numbers), or the largest errors "a/b/c".
pick() {
  local f=$tmp/res/$1 v
  if [[ $2 == *err ]]; then
    # the worst round, field by field
    while read -r l; do val "$l" "$2"; done <"$f" | awk -F/ '{for (i = 1; i <= 3; i++) if ($i > m[i]) m[i] = $i}
      END {printf "%d/%d/%d\n", m[1], m[2], m[3]}'
    return
  fi
  while read -r l; do v=$(val "$l" "$2"); [[ -n $v && $v != "?" ]] && echo "$v"; done <"$f" | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) print "?"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
what="one round"
((REPEAT > 1)) && what="medians of $REPEAT rounds (errors: the worst round)"

echo
echo "keel at real upstream latency vs straight to the upstream ($what)"
echo "  host: $(nproc) cores, loadavg at start $load_at_start, at end $(cut -d' ' -f1-3 /proc/loadavg); wrk -t$WRK_THREADS, keel and the upstream(s) share these cores"
echo "  keel: $KEEL (server: max_connections $keel_max_conns, per ip the same, handler_threads ${HANDLER_THREADS:-default}, io_threads ${IO_THREADS:-default}; engine.workers 0 for the gateway rows)"
echo "  upstream: keel mock-llm --latency-ms $LATENCY_MS; wrk $DURATION per run, --timeout $WRK_TIMEOUT; ulimit -n $(ulimit -n)"
if ((${#rows[@]})); then
  echo "  req/s: whole 2xx answers per second; errors: non-2xx/socket/incomplete; threads: peak (idle); RSS: peak MiB"
  fmt='  %-22s %6s %9s %9s %7s %16s %16s %8s %11s %11s %10s %7s\n'
  # shellcheck disable=SC2059
  printf "$fmt" "row" "conns" "direct/s" "keel/s" "ratio" "direct p50/p99" "keel p50/p99" "+p99" "err direct" "err keel" "threads" "RSS"
  # shellcheck disable=SC2059
  printf "$fmt" "" "" "" "" "" "ms" "ms" "ms" "" "" "" "MiB"
  for key in "${rows[@]}"; do
    IFS=- read -r kind transport conns <<<"$key"
    name="$([[ $kind == chat ]] && echo "chat" || echo "chat, streamed"), $([[ $transport == tls ]] && echo "https" || echo "http")"
    if [[ $(val "$(head -1 "$tmp/res/$key")" keel) == na ]]; then
      printf '  %-22s %6s %9s %9s %7s %16s   %s\n' "$name" "$conns" "$(pick "$key" d_rps)" "-" "-" \
        "$(pick "$key" d_p50) / $(pick "$key" d_p99)" "(err direct $(pick "$key" d_err)) through keel: not supported by this keel: $tls_msg"
      continue
    fi
    # shellcheck disable=SC2059
    printf "$fmt" "$name" "$conns" "$(pick "$key" d_rps)" "$(pick "$key" k_rps)" "$(pick "$key" ratio)%" \
      "$(pick "$key" d_p50) / $(pick "$key" d_p99)" "$(pick "$key" k_p50) / $(pick "$key" k_p99)" \
      "$(pick "$key" added)" "$(pick "$key" d_err)" "$(pick "$key" k_err)" \
      "$(pick "$key" threads) ($(pick "$key" idle_threads))" "$(pick "$key" rss)"
  done
  if has tls && [[ $TLS != 1 ]]; then echo "  TLS rows skipped (TLS=0)"; fi
fi

pipeline_bad=""
if has pipeline; then
  p() { pick pipeline "$1"; }
  row() { printf '  %-38s %s\n' "$1" "$2"; }
  echo
  echo "pipelines at real latency: $RUNS runs of bench3 (llm -> llm -> transform) submitted at once, mock --latency-ms $PIPELINE_LATENCY_MS ($what)"
  row "engine.workers" "$workers_eff${workers_note:+  ($workers_note)}"
  row "runs/s (first submit -> last success)" "$(p runs_s)  ($(p ok) runs in $(p span_s) s)"
  row "bound (WORKERS=$WORKERS)" "$(p bound) runs/s; ratio $(p ratio)%"
  [[ $workers_eff != "$WORKERS" ]] && row "bound (workers $workers_eff, as run)" "$(p bound_eff) runs/s; ratio $(p ratio_eff)%"
  ((RUNS < workers_eff)) && row "note" "RUNS < workers: every run is in flight at once; the bound cannot be reached"
  row "submits 201 / other / socket errors" "$(p n201) / $(p nother) / $(p nsock)  (curl --parallel-max $SUBMIT_PARALLEL)"
  row "submit p50 / p99" "$(p sub_p50) ms / $(p sub_p99) ms; all submitted in $(p sub_s) s"
  row "lost / failed runs" "$(p lost) / $(p bad)"
  row "mock calls (expected $((2 * RUNS)))" "$(p mock_total); most calls of one prompt: $(p max_prompt) (expected 1)"
  row "keel threads / RSS at the peak" "$(p threads) / $(p rss) MiB"
  # Validity, every round.
  while read -r l; do
    [[ $(val "$l" n201) == "$RUNS" ]] || pipeline_bad+=" submits refused or failed ($(val "$l" n201) of $RUNS answered 201);"
    (($(val "$l" lost) == 0)) || pipeline_bad+=" $(val "$l" lost) runs not finished within DRAIN_TIMEOUT=${DRAIN_TIMEOUT}s;"
    (($(val "$l" bad) == 0)) || pipeline_bad+=" $(val "$l" bad) runs failed;"
    if [[ $(val "$l" mock_total) != $((2 * RUNS)) || ($(val "$l" max_prompt) != 1 && $(val "$l" max_prompt) != "?") ]]; then
      echo "  WARNING: the mock saw $(val "$l" mock_total) calls (expected $((2 * RUNS))), at most $(val "$l" max_prompt) of one prompt"
    fi
  done <"$tmp/res/pipeline"
fi
echo
[[ -z $pipeline_bad ]] || die "invalid pipeline measurement:$pipeline_bad"
exit 0
