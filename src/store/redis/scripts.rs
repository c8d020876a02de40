//! The Lua scripts, built once and called by SHA (`EVALSHA`, reloaded on
//! `NOSCRIPT` by [`redis::Script`]), and the batch library, loaded once and
//! called by name (`FCALL`, reloaded when Redis does not have it: see
//! [`fcall`]). Each operation's file under `lua/` is prefixed with
//! `lua/lib.lua`, the helpers they share; [`BATCH`] holds the hold
//! operations as functions, to run several in one call.

use std::sync::LazyLock;

use redis::{FromRedisValue, RedisError, RedisResult, Script};
use sha2::{Digest, Sha256};

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/lib.lua")),
                "\nbegin(ARGV)\n",
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

/// A Redis function library (Redis 7): its code runs once, when it is
/// loaded (`FUNCTION LOAD`), and each call (`FCALL`) only runs the
/// function. A script runs its whole text on every call, and for the batch
/// script defining lib.lua's functions cost more than a call with nothing
/// to do (deploy/BENCHMARKS.md, 2026-12-03, late).
///
/// The library and its function are named after a digest of the text, so
/// that daemons of two builds sharing a Redis (a rolling upgrade) each
/// call their own code. Earlier builds' libraries stay in Redis until
/// deleted (`FUNCTION DELETE holdfast_<digest>`); each is about 33 KB.
#[derive(Debug)]
pub struct Library {
    /// The function to call, `holdfast_batch_<digest>`.
    pub function: String,
    /// What `FUNCTION LOAD` takes; its first line names the library,
    /// `holdfast_<digest>`.
    pub text: String,
}

impl Library {
    /// The library of `source`, whose one function is registered under
    /// the placeholder `HOLDFAST_BATCH`.
    pub(super) fn new(source: &str) -> Self {
        let digest: String = Sha256::digest(source.as_bytes())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let function = format!("holdfast_batch_{digest}");
        let text = format!(
            "#!lua name=holdfast_{digest}\n{}",
            source.replace("'HOLDFAST_BATCH'", &format!("'{function}'"))
        );
        Self { function, text }
    }

    /// An `FCALL` of the function with no keys (see lua/reserve.lua),
    /// to which the caller adds the arguments.
    pub fn call(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.function).arg(0);
        cmd
    }
}

/// The hold operations in one function (`lua/batch.lua`): each runs as its
/// own script would, one after the other, in one atomic call.
pub static BATCH: LazyLock<Library> = LazyLock::new(|| {
    Library::new(concat!(
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

/// Runs `call` (from [`Library::call`]); when Redis does not have the
/// library (a Redis that lost its data, or a replica promoted before it
/// had the library), loads it and runs `call` once more, as
/// [`redis::Script`] does on `NOSCRIPT`.
pub async fn fcall<T: FromRedisValue>(
    con: &mut impl redis::aio::ConnectionLike,
    library: &Library,
    call: &redis::Cmd,
) -> RedisResult<T> {
    match call.query_async(con).await {
        Err(e) if is_missing_function(&e) => {
            load(con, library).await?;
            call.query_async(con).await
        }
        other => other,
    }
}

/// Loads `library` into Redis; one that is already there (another daemon
/// of the same build loaded it) is as good.
pub async fn load(con: &mut impl redis::aio::ConnectionLike, library: &Library) -> RedisResult<()> {
    let loaded: RedisResult<String> = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&library.text)
        .query_async(con)
        .await;
    match loaded {
        Err(e) if !e.detail().is_some_and(|d| d.ends_with("already exists")) => Err(e),
        _ => Ok(()),
    }
}

fn is_missing_function(e: &RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.starts_with("Function not found"))
}

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
