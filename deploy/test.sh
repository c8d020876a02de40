#!/usr/bin/env bash
# The second command: every test, against real Redis and Postgres.
#
# Installs what is missing, starts one Redis and one Postgres on free
# loopback ports in a temporary folder (each test then makes its own
# database and Redis key prefix), runs the checks (buf lint, the deploy
# files: deploy/check.sh, fmt, clippy) and the whole test suite,
# and stops the servers whatever happens.
source "$(dirname "$0")/lib.sh"

ensure_servers
ensure_py_tools

TMP="$(mktemp -d /tmp/holdfast-test.XXXXXX)"
chmod 755 "$TMP"
REDIS_PORT="$(free_port)"
PG_PORT="$(free_port)"
cleanup() {
  stop_redis "$TMP/redis" "$REDIS_PORT"
  stop_postgres "$TMP/pg"
  rm -rf "$TMP"
}
trap cleanup EXIT

log "buf lint"
(cd "$ROOT/proto" && buf lint)

"$ROOT/deploy/check.sh"

log "cargo fmt --check"
cargo fmt --manifest-path "$ROOT/Cargo.toml" --check

log "cargo clippy"
cargo clippy --manifest-path "$ROOT/Cargo.toml" --all-targets --quiet -- -D warnings

log "starting Redis on 127.0.0.1:$REDIS_PORT and Postgres on 127.0.0.1:$PG_PORT"
start_redis "$TMP/redis" "$REDIS_PORT"
PG_FSYNC=off start_postgres "$TMP/pg" "$PG_PORT"

export HOLDFAST_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export HOLDFAST_TEST_DATABASE_URL="postgres://holdfast@127.0.0.1:$PG_PORT/holdfast"
export PATH="$ROOT/target/debug:$PATH"

# Show what tests print (the fault suite's per-scenario lines and its
# closing `faults: ...` summary).
export RUST_TEST_NOCAPTURE=1

log "cargo test"
cargo test --manifest-path "$ROOT/Cargo.toml" --quiet "$@"
