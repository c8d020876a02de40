//! The Lua scripts, built once and called by SHA (`EVALSHA`, reloaded on
//! `NOSCRIPT` by [`redis::Script`]). Each operation's file under `lua/` is
//! prefixed with `lua/lib.lua`, the helpers they share; [`BATCH`] holds the
//! hold operations as functions, to run several in one call.

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

/// An operation's file as a local function of its own `ARGV`, for
/// [`BATCH`]: its top-level `return` becomes the function's.
macro_rules! op {
    ($name:literal) => {
        concat!(
            "\nlocal function op_",
            $name,
            "(ARGV)\n",
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $name, ".lua")),
            "\nend\n"
        )
    };
}

/// The hold operations in one script (`lua/batch.lua`): each runs as its
/// own script would, one after the other, in one atomic call.
pub static BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/lib.lua")),
        op!("reserve"),
        op!("claim"),
        op!("commit"),
        op!("release"),
        op!("extend"),
        op!("get_hold"),
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/batch.lua"))
    ))
});

/// Hold units from pools, all-or-nothing.
pub static RESERVE: LazyLock<Script> = script!("reserve.lua");
/// Take and sell units in one step.
pub static CLAIM: LazyLock<Script> = script!("claim.lua");
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
/// Write cards' listing mirror on a channel, unless newer.
pub static SET_LISTINGS: LazyLock<Script> = script!("set_listings.lua");
/// Count active holds past their expiry (a check, see [`super::overdue_holds`]).
pub static OVERDUE: LazyLock<Script> = script!("overdue.lua");
