//! The Lua scripts, built once and called by SHA (`EVALSHA`, reloaded on
//! `NOSCRIPT` by [`redis::Script`]). Each operation's file under `lua/` is
//! prefixed with `lua/lib.lua`, the helpers they share.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/lib.lua")),
                "\n",
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $file))
            ))
        })
    };
}

/// Hold units from pools, all-or-nothing.
pub static RESERVE: LazyLock<Script> = script!("reserve.lua");
/// Take and sell units in one step.
pub static CLAIM: LazyLock<Script> = script!("claim.lua");
/// Sell an active hold's units.
pub static COMMIT: LazyLock<Script> = script!("commit.lua");
/// Give an active hold's units back.
pub static RELEASE: LazyLock<Script> = script!("release.lua");
/// Move an active hold's expiry.
pub static EXTEND: LazyLock<Script> = script!("extend.lua");
/// Read a hold.
pub static GET_HOLD: LazyLock<Script> = script!("get_hold.lua");
/// Read pools' counts.
pub static GET_POOLS: LazyLock<Script> = script!("get_pools.lua");
/// Record a pool's grant from Postgres.
pub static GRANT: LazyLock<Script> = script!("grant.lua");
/// Hand units of a grant back to Postgres.
pub static RETURN: LazyLock<Script> = script!("return.lua");
/// Finalise expired holds.
pub static SWEEP: LazyLock<Script> = script!("sweep.lua");
/// Read who holds or sold capacity-1 pools (cards).
pub static HOLDERS: LazyLock<Script> = script!("holders.lua");
