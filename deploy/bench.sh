#!/usr/bin/env bash
# The benchmark: builds holdfast (release), starts its own Redis (no AOF:
# the engine, not the disk, is measured) and Postgres (fsync on, as a
# Postgres-only shop would run it) on free loopback ports, and runs
# `holdfast bench` with them; arguments go to it, e.g.
#   ./deploy/bench.sh --workload claim-hot --duration 10 --clients 64
# REDIS_AOF=yes runs Redis as production should (AOF, appendfsync always),
# the baseline too; REDIS_OPTS adds Redis settings (deploy/lib.sh).
# Figures and how to read them: deploy/BENCHMARKS.md.
source "$(dirname "$0")/lib.sh"

ensure_servers

log "cargo build --release"
cargo build --manifest-path "$ROOT/Cargo.toml" --release --quiet

REDIS_AOF="${REDIS_AOF:-no}" start_servers bench
export PATH="$(pg_bindir):$PATH"

# This script drives the daemon it starts: an address or key left in the
# environment for `holdfast bench --addr` would send the load elsewhere.
unset HOLDFAST_BENCH_ADDR HOLDFAST_BENCH_API_KEY

log "holdfast bench $*"
"$ROOT/target/release/holdfast" bench "$@"
