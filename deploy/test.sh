#!/usr/bin/env bash
# The second command: every test, against real Redis and Postgres.
#
# Installs what is missing, starts one Redis and one Postgres on free
# loopback ports in a temporary folder (each test then makes its own
# database and Redis key prefix), runs the checks (buf lint, the deploy
# files: deploy/check.sh, fmt, clippy, rustdoc) and the whole test suite,
# and stops the servers whatever happens.
source "$(dirname "$0")/lib.sh"

ensure_servers
ensure_py_tools

log "buf lint"
(cd "$ROOT/proto" && buf lint)

"$ROOT/deploy/check.sh"

log "cargo fmt --check"
cargo fmt --manifest-path "$ROOT/Cargo.toml" --check

log "cargo clippy"
cargo clippy --manifest-path "$ROOT/Cargo.toml" --all-targets --quiet -- -D warnings

# Doc comments are how this code explains itself: a broken link in one
# is a reader sent nowhere.
log "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --manifest-path "$ROOT/Cargo.toml" --no-deps --quiet

PG_FSYNC=off start_servers test
export HOLDFAST_TEST_REDIS_URL="$HOLDFAST_REDIS_URL"
export HOLDFAST_TEST_DATABASE_URL="$HOLDFAST_DATABASE_URL"
export PATH="$ROOT/target/debug:$PATH"

# Show what tests print (the fault suite's per-scenario lines and its
# closing `faults: ...` summary).
export RUST_TEST_NOCAPTURE=1

log "cargo test"
cargo test --manifest-path "$ROOT/Cargo.toml" --quiet "$@"
