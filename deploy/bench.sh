#!/usr/bin/env bash
# The benchmark: builds holdfast (release), starts its own Redis (no AOF:
# the engine, not the disk, is measured) and Postgres (fsync on, as a
# Postgres-only shop would run it) on free loopback ports, and runs
# `holdfast bench` with them; arguments go to it, e.g.
#   ./deploy/bench.sh --workload claim-hot --duration 10 --clients 64
# Figures and how to read them: deploy/BENCHMARKS.md.
source "$(dirname "$0")/lib.sh"

ensure_servers

TMP="$(mktemp -d /tmp/holdfast-bench.XXXXXX)"
chmod 755 "$TMP"
REDIS_PORT="$(free_port)"
PG_PORT="$(free_port)"
cleanup() {
  stop_redis "$TMP/redis" "$REDIS_PORT"
  stop_postgres "$TMP/pg"
  rm -rf "$TMP"
}
trap cleanup EXIT

log "cargo build --release"
cargo build --manifest-path "$ROOT/Cargo.toml" --release --quiet

log "starting Redis on 127.0.0.1:$REDIS_PORT and Postgres on 127.0.0.1:$PG_PORT"
REDIS_AOF=no start_redis "$TMP/redis" "$REDIS_PORT"
start_postgres "$TMP/pg" "$PG_PORT"

export HOLDFAST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export HOLDFAST_DATABASE_URL="postgres://holdfast@127.0.0.1:$PG_PORT/holdfast"
export PATH="$(pg_bindir):$PATH"

log "holdfast bench $*"
"$ROOT/target/release/holdfast" bench "$@"
