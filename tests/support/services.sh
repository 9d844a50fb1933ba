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
#   services.sh redis-start DIR      start redis-server; prints redis://127.0.0.1:PORT,
#                                    also written to DIR/redis.url
#   services.sh redis-restart DIR    start it again on the same port after a stop
#   services.sh redis-stop DIR
#   services.sh stop-all DIR         both, if running (a CTest cleanup fixture)
#
# PostgreSQL refuses to run as root: as root, the servers run as the `postgres` user.
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
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

case "$cmd" in
  postgres-start|postgres-restart)
    bin="$(pg_bin)"
    data="$dir/pg"
    if [ ! -f "$data/PG_VERSION" ]; then
      mkdir -p "$data"
      # The server's user must reach its data directory through ours.
      if [ "$(id -u)" -eq 0 ]; then chown postgres: "$data"; chmod o+x "$dir"; fi
      chmod 700 "$data"
      as_owner "$bin/initdb" -D "$data" -U keel -A trust -E UTF8 --no-locale >"$dir/pg-initdb.log" 2>&1 ||
        { cat "$dir/pg-initdb.log" >&2; exit 1; }
      # Throwaway test data: no fsync (a killed server loses nothing the OS holds;
      # only a machine crash would), room for many keel nodes' pools.
      cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
full_page_writes = off
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
    if [ -f "$dir/pg/postmaster.pid" ]; then
      as_owner "$bin/pg_ctl" -D "$dir/pg" -m "$mode" -w -t 60 stop >/dev/null
    fi
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
    "$0" postgres-stop "$dir" fast || true
    "$0" redis-stop "$dir" || true
    ;;
  *)
    echo "services.sh: unknown command $cmd" >&2
    exit 2
    ;;
esac
