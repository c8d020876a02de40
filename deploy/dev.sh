#!/usr/bin/env bash
# The first command: from a fresh machine to a running daemon.
#
# Installs Redis and Postgres from Debian's packages if they are missing,
# starts them on loopback with their data under .holdfast/, builds holdfast
# and serves it in development mode (no auth, tenant "dev") on
# 127.0.0.1:50051 with metrics on 127.0.0.1:9464. Ctrl-C stops the daemon
# and both servers. Ports can be changed with HOLDFAST_GRPC_ADDR,
# HOLDFAST_METRICS_ADDR, DEV_REDIS_PORT and DEV_PG_PORT.
source "$(dirname "$0")/lib.sh"

STATE="$ROOT/.holdfast"
REDIS_PORT="${DEV_REDIS_PORT:-6391}"
PG_PORT="${DEV_PG_PORT:-5441}"

ensure_servers
mkdir -p "$STATE"
stop_all() {
  log "stopping Redis and Postgres"
  stop_redis "$STATE/redis" "$REDIS_PORT"
  stop_postgres "$STATE/pg"
}
trap stop_all EXIT

log "starting Redis on 127.0.0.1:$REDIS_PORT and Postgres on 127.0.0.1:$PG_PORT (data in .holdfast/)"
start_redis "$STATE/redis" "$REDIS_PORT"
start_postgres "$STATE/pg" "$PG_PORT"

log "building holdfast (release)"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"

export HOLDFAST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export HOLDFAST_DATABASE_URL="postgres://holdfast@127.0.0.1:$PG_PORT/holdfast"
log "serving gRPC on ${HOLDFAST_GRPC_ADDR:-127.0.0.1:50051}, metrics on ${HOLDFAST_METRICS_ADDR:-127.0.0.1:9464}; Ctrl-C stops"
"$ROOT/target/release/holdfast" serve --dev "$@" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid || true; stop_all' EXIT
trap 'exit 0' INT TERM
wait $pid
