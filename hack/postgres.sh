#!/usr/bin/env bash
# A throwaway PostgreSQL on loopback for the journal tests.
#
#   hack/postgres.sh start   installs PostgreSQL from Debian's packages if it
#                            is missing, starts a fresh cluster, prints its DSN
#   hack/postgres.sh stop    stops it
#
# PostgreSQL refuses to run as root, so as root the cluster is initialised
# and run as the unprivileged "postgres" user the package creates. It listens
# on 127.0.0.1 only and trusts local connections: it is for tests alone.
set -euo pipefail
state=${TRUSTMESH_PG_DIR:-/tmp/trustmesh-pg-$(id -u)}
port=${TRUSTMESH_PG_PORT:-55432}

as_db_user() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

install() {
  if [ -n "$(bindir)" ] && [ -x "$(bindir)/initdb" ]; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "postgres.sh: PostgreSQL is not installed; run as root or apt-get install postgresql" >&2
    exit 1
  fi
  echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

stop() {
  local bin; bin=$(bindir)
  if [ -n "$bin" ] && [ -f "$state/data/postmaster.pid" ]; then
    as_db_user "$bin/pg_ctl" -D "$state/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
start)
  install
  bin=$(bindir)
  stop
  rm -rf "$state"
  mkdir -p "$state"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$state"; fi
  as_db_user "$bin/initdb" -D "$state/data" -A trust -U trustmesh --no-sync >"$state/initdb.log" 2>&1 ||
    { cat "$state/initdb.log" >&2; exit 1; }
  as_db_user "$bin/pg_ctl" -D "$state/data" -l "$state/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $state -c max_connections=200" start >/dev/null ||
    { cat "$state/server.log" >&2; exit 1; }
  echo "postgres://trustmesh@127.0.0.1:$port/postgres?sslmode=disable"
  ;;
stop)
  stop
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
