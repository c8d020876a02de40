//! The deadline of the call being served, as its caller sent it
//! (`grpc-timeout`, which every gRPC stub given a deadline sends).
//!
//! tonic reads the header only to cancel the call when it passes. Past the
//! daemon's peak that is too late: calls wait for their turn to Redis in
//! the order they came, so the one sent is the one that waited longest,
//! at the edge of its deadline, and a unit sold then is answered after
//! its caller gave up (deploy/BENCHMARKS.md, "a stampede past the peak").
//! [`Deadlines`], a layer in front of every service, keeps each call's
//! deadline in a task-local for the length of its future, and the
//! coalescers read it ([`current`]) to leave unsent a call that could not
//! be answered in time.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::task::futures::TaskLocalFuture;
use tonic::codegen::Service;

tokio::task_local! {
    static DEADLINE: Option<Instant>;
}

/// The deadline of the call whose future is running; `None` outside a
/// call (a background job) or for a call that carried none.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok().flatten()
}

/// Runs `fut` as a call with `deadline`.
pub fn scope<F: Future>(deadline: Option<Instant>, fut: F) -> TaskLocalFuture<Option<Instant>, F> {
    DEADLINE.scope(deadline, fut)
}

/// A `grpc-timeout` value: 1 to 8 digits and a unit, `H`ours, `M`inutes,
/// `S`econds, `m`illiseconds, `u`icroseconds or `n`anoseconds
/// (gRPC over HTTP/2), as tonic reads it to cancel the call. `None` for
/// anything else: the call then runs without a deadline, here as in
/// tonic, which ignores a value it cannot read.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The layer that gives each call its deadline ([`scope`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadlines;

impl<S> tower_layer::Layer<S> for Deadlines {
    type Service = WithDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithDeadline(inner)
    }
}

/// A service whose calls run with their deadlines.
#[derive(Debug, Clone)]
pub struct WithDeadline<S>(S);

impl<S, B> Service<http::Request<B>> for WithDeadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TaskLocalFuture<Option<Instant>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .and_then(|d| Instant::now().checked_add(d));
        scope(deadline, self.0.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_by_their_unit() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("300000000u"), None, "nine digits");
        assert_eq!(
            parse_grpc_timeout("30000000u"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_grpc_timeout("3000000u"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "10", "10x", "-1m", "1.5S", " 1m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_call_sees_its_own_deadline_and_a_job_none() {
        let at = Instant::now() + Duration::from_secs(1);
        assert_eq!(scope(Some(at), async { current() }).await, Some(at));
        assert_eq!(current(), None);
        let job = tokio::spawn(scope(Some(at), async {
            tokio::spawn(async { current() }).await.unwrap()
        }));
        assert_eq!(job.await.unwrap(), None, "a task it spawns is not the call");
    }
}
