#!/usr/bin/env bash
# Starts and stops throwaway PostgreSQL and Redis servers for the tests and benchmarks: on
# loopback, on a free port, with their data in a directory of the caller's, never the
# machine's own clusters. scripts/setup.sh installs both (Debian's postgresql and
# redis-server).
#
#   services.sh postgres-start DIR   initdb DIR/pg (once) and start it; prints the URL
#                                    (postgres://keel@127.0.0.1:PORT/postgres), also
#                                    written to DIR/postgres.url
#   services.sh postgres-stop DIR [fast|immediate]
#                                    stop it (immediate: like a crash; the data stays)
#   services.sh postgres-restart DIR start it again on the same port after a stop
#   services.sh postgres-remove DIR  stop it and delete its data
#   services.sh redis-start DIR      start redis-server; prints redis://127.0.0.1:PORT,
#                                    also written to DIR/redis.url
#   services.sh redis-restart DIR    start it again on the same port after a stop
#   services.sh redis-stop DIR
#   services.sh stop-all DIR         both, if running (a CTest cleanup fixture)
#
# Environment:
#   KEEL_PG_DURABLE=1  initdb a PostgreSQL with durable commits (fsync, synchronous_commit
#                      and full_page_writes on: PostgreSQL's defaults), for benchmarks that
#                      compare with keel's durable SQLite. Default: fsync and
#                      full_page_writes off (a killed server loses nothing, only a machine
#                      crash would). Read when DIR/pg is created; the cluster keeps it
#                      across stops and restarts.
#
# PostgreSQL refuses to run as root: as root, the servers run as the `postgres` user, and
# when that user cannot reach DIR (a checkout under /root, say) the data lives in a
# directory of its own under /tmp, named in DIR/pg.path and deleted by postgres-remove.
set -euo pipefail

cmd="${1:?usage: services.sh COMMAND DIR}"
dir="${2:?usage: services.sh COMMAND DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

pg_bin() {
  local b
  for b in /usr/lib/postgresql/*/bin; do
    if [ -x "$b/initdb" ]; then echo "$b"; return; fi
  done
  echo "services.sh: no PostgreSQL server binaries under /usr/lib/postgresql (run scripts/setup.sh)" >&2
  exit 1
}

as_owner() {
  if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The data directory of DIR's server (decided once, when it is created).
pg_data() {
  if [ -f "$dir/pg.path" ]; then cat "$dir/pg.path"; return; fi
  if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -x "$dir" 2>/dev/null; then
    chmod o+x "$dir" 2>/dev/null || true
  fi
  if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -x "$dir" 2>/dev/null; then
    local d
    d="$(mktemp -d "${TMPDIR:-/tmp}/keel-test-pg.XXXXXX")"
    chmod 755 "$d"
    echo "$d/pg" >"$dir/pg.path"
    echo "$d/pg"
    return
  fi
  echo "$dir/pg"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

case "$cmd" in
  postgres-start|postgres-restart)
    bin="$(pg_bin)"
    data="$(pg_data)"
    if [ ! -f "$data/PG_VERSION" ]; then
      mkdir -p "$data"
      if [ "$(id -u)" -eq 0 ]; then chown postgres: "$data"; fi
      chmod 700 "$data"
      as_owner "$bin/initdb" -D "$data" -U keel -A trust -E UTF8 --no-locale >"$dir/pg-initdb.log" 2>&1 ||
        { cat "$dir/pg-initdb.log" >&2; exit 1; }
      # Throwaway test data: no fsync (a killed server loses nothing the OS holds;
      # only a machine crash would), unless KEEL_PG_DURABLE=1; room for many keel nodes'
      # pools.
      if [ "${KEEL_PG_DURABLE:-0}" = 1 ]; then
        durability=$'fsync = on\nsynchronous_commit = on\nfull_page_writes = on'
      else
        durability=$'fsync = off\nfull_page_writes = off'
      fi
      cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
$durability
max_connections = 300
shared_buffers = 128MB
EOF
    fi
    if [ "$cmd" = postgres-restart ] && [ -f "$dir/postgres.port" ]; then
      port="$(cat "$dir/postgres.port")"
    else
      port="$(free_port)"
    fi
    as_owner "$bin/pg_ctl" -D "$data" -o "-p $port" -l "$data/server.log" -w -t 60 start >/dev/null ||
      { tail -20 "$data/server.log" >&2; exit 1; }
    echo "$port" >"$dir/postgres.port"
    echo "postgres://keel@127.0.0.1:$port/postgres" | tee "$dir/postgres.url"
    ;;
  postgres-stop)
    bin="$(pg_bin)"
    mode="${3:-fast}"
    data="$(pg_data)"
    if [ -f "$data/postmaster.pid" ]; then
      as_owner "$bin/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >/dev/null
    fi
    ;;
  postgres-remove)
    "$0" postgres-stop "$dir" fast || true
    if [ -f "$dir/pg.path" ]; then
      rm -rf "$(dirname "$(cat "$dir/pg.path")")"
      rm -f "$dir/pg.path"
    fi
    rm -rf "$dir/pg"
    ;;
  redis-start|redis-restart)
    if [ "$cmd" = redis-restart ] && [ -f "$dir/redis.port" ]; then
      port="$(cat "$dir/redis.port")"
    else
      port="$(free_port)"
    fi
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly no \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
    for _ in $(seq 1 200); do
      if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then break; fi
      sleep 0.05
    done
    redis-cli -p "$port" ping | grep -q PONG || { tail -20 "$dir/redis.log" >&2; exit 1; }
    echo "$port" >"$dir/redis.port"
    echo "redis://127.0.0.1:$port" | tee "$dir/redis.url"
    ;;
  redis-stop)
    if [ -f "$dir/redis.pid" ]; then
      pid="$(cat "$dir/redis.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      rm -f "$dir/redis.pid"
    fi
    ;;
  stop-all)
    "$0" postgres-remove "$dir" || true
    "$0" redis-stop "$dir" || true
    ;;
  *)
    echo "services.sh: unknown command $cmd" >&2
    exit 2
    ;;
esac
