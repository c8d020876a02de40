//! The crate's one error type and its one mapping to a gRPC status.
//!
//! Business outcomes (sold out, not active, over a customer limit) are not
//! errors: they travel as typed outcomes in OK responses. What is here is
//! what the caller must fix or retry. Internal causes are logged once, where
//! the status is made, and never sent to the client.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can make an RPC fail. Each variant's doc says what the
/// client sees.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// INVALID_ARGUMENT, with a `BadRequest` detail naming the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, as a path (`lines[2].quantity`).
        field: String,
        /// What is wrong with it, in words a caller can act on.
        reason: String,
    },
    /// NOT_FOUND: the sale, pool or hold does not exist for this tenant.
    #[error("{0} not found")]
    NotFound(String),
    /// ALREADY_EXISTS: the id is taken by a different definition.
    #[error("{0}")]
    AlreadyExists(String),
    /// FAILED_PRECONDITION: the call does not fit the hold's life (extend
    /// twice, commit a released hold...); the message says why.
    #[error("{0}")]
    FailedPrecondition(String),
    /// RESOURCE_EXHAUSTED: a per-tenant bound was reached (active holds).
    #[error("{0}")]
    ResourceExhausted(String),
    /// UNAUTHENTICATED: no credential, or not a valid one.
    #[error("{0}")]
    Unauthenticated(String),
    /// PERMISSION_DENIED: the credential's role may not make this call.
    #[error("{0}")]
    PermissionDenied(String),
    /// UNAVAILABLE: a store could not be reached in time; retrying with the
    /// same id is safe.
    #[error("{0}")]
    Unavailable(String),
    /// DEADLINE_EXCEEDED: the call's deadline would pass before the store
    /// could answer it, so it was not sent, and changed nothing.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// UNAVAILABLE, from Redis in particular: the engine counts these to
    /// open its circuit and serve from the Postgres fallback.
    #[error("{0}")]
    RedisUnavailable(String),
    /// INTERNAL: a bug or a broken invariant; logged, never detailed to the
    /// client.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Internal`] from a message.
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(anyhow::anyhow!(msg.into()))
    }

    /// The same error for each caller of a failed batch or of a shared
    /// load (src/cache.rs): errors are not Clone, since an internal one
    /// carries its cause. Every other kind is copied as it is; an internal
    /// one keeps its message (its whole chain) without the cause.
    pub fn share(&self) -> Self {
        match self {
            Error::InvalidArgument { field, reason } => Error::invalid(field, reason),
            Error::NotFound(what) => Error::NotFound(what.clone()),
            Error::AlreadyExists(why) => Error::AlreadyExists(why.clone()),
            Error::FailedPrecondition(why) => Error::FailedPrecondition(why.clone()),
            Error::ResourceExhausted(why) => Error::ResourceExhausted(why.clone()),
            Error::Unauthenticated(why) => Error::Unauthenticated(why.clone()),
            Error::PermissionDenied(why) => Error::PermissionDenied(why.clone()),
            Error::Unavailable(why) => Error::Unavailable(why.clone()),
            Error::DeadlineExceeded(why) => Error::DeadlineExceeded(why.clone()),
            Error::RedisUnavailable(why) => Error::RedisUnavailable(why.clone()),
            Error::Internal(e) => Error::internal(format!("{e:#}")),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
        {
            Error::RedisUnavailable(format!("redis unreachable: {e}"))
        } else if redis_not_now(&e) {
            Error::RedisUnavailable(format!("redis cannot serve now: {e}"))
        } else {
            Error::Internal(e.into())
        }
    }
}

/// Whether Redis refused a call without running it, for a while: it is
/// loading its data after a restart (LOADING), another script is running
/// too long (BUSY), it is full (OOM) or cannot persist (MISCONF), or it is
/// a replica or mid-failover. Like an unreachable Redis, these open the
/// circuit and the caller is told UNAVAILABLE, not INTERNAL.
fn redis_not_now(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some(
            "LOADING"
                | "BUSY"
                | "OOM"
                | "MISCONF"
                | "READONLY"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
        )
    )
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if postgres_away(&e) {
            Error::Unavailable(format!("postgres unavailable, retry: {e}"))
        } else {
            Error::Internal(e.into())
        }
    }
}

/// Whether Postgres could not serve the call but will again: it cannot be
/// reached, or it ended the session because it is shutting down,
/// restarting or starting up (SQLSTATE class 08, and 57P01-57P03). A caller
/// should retry these with the same id (UNAVAILABLE), as after a timeout,
/// not report a bug (INTERNAL): the ended transaction was rolled back.
fn postgres_away(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                msg,
                ErrorDetails::with_bad_request_violation(field, reason),
            ),
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::Unauthenticated(_) => Status::unauthenticated(msg),
            Error::PermissionDenied(_) => Status::permission_denied(msg),
            Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            Error::Unavailable(_) | Error::RedisUnavailable(_) => {
                tracing::warn!(error = %msg, "store unavailable");
                Status::unavailable(msg)
            }
            Error::Internal(cause) => {
                tracing::error!(error = ?cause, "internal error");
                Status::internal("internal error; see the daemon's log")
            }
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn redis_refusing_for_now_is_unavailable_and_a_script_error_is_internal() {
        let loading: redis::RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "loading",
        )
            .into();
        assert!(matches!(Error::from(loading), Error::RedisUnavailable(_)));
        for code in ["BUSY", "OOM", "MISCONF"] {
            let e = redis::make_extension_error(code.into(), Some("now".into()));
            assert!(
                matches!(Error::from(e), Error::RedisUnavailable(_)),
                "{code}"
            );
        }
        let script = redis::make_extension_error("ERR".into(), Some("user_script:1".into()));
        assert!(matches!(Error::from(script), Error::Internal(_)));
    }
}
