//! The gRPC edge: generated code, request parsing, authentication and one
//! thin adapter per service. Each RPC is the same few lines: authenticate,
//! parse the request into domain types, call the service, convert back.

mod admin;
pub mod auth;
mod channel;
mod convert;
mod event_tap;
mod event_wire;
mod events;
mod flash_sale;
mod reservation;
mod sale_lock;
mod slot;

use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;

use metrics::{Counter, Histogram};

use tonic::{Code, Response, Status};
use tracing::Instrument;

pub use admin::AdminApi;
pub use channel::ChannelApi;
pub use event_tap::SHARED as WATCH_TAPS_PER_READER;
pub use event_wire::EventServer;
pub use events::EventApi;
pub use flash_sale::FlashSaleApi;
pub use reservation::ReservationApi;
pub use sale_lock::SaleLockApi;
pub use slot::SlotApi;

use crate::error::Error;
use crate::telemetry::{Handles, metric};

/// The code generated from `proto/holdfast/v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("holdfast.v1");

    /// The file descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("holdfast_descriptor");
}

/// The metric handles of one RPC method, made at its first call and kept
/// (see [`Handles`] for why). Made by [`meter!`], one `static` per call
/// site.
pub(crate) struct RpcMeter {
    service: &'static str,
    method: &'static str,
    seconds: OnceLock<Histogram>,
    /// A counter per gRPC code; a method ends with a few.
    calls: Handles<Code, Counter, 6>,
}

impl RpcMeter {
    /// A meter for `service`'s `method`, with no handle made yet.
    pub(crate) const fn new(service: &'static str, method: &'static str) -> Self {
        Self {
            service,
            method,
            seconds: OnceLock::new(),
            calls: Handles::new(),
        }
    }

    /// Counts one call that ended with `code` and took `seconds`.
    fn record(&self, code: Code, seconds: f64) {
        let (service, method) = (self.service, self.method);
        self.calls
            .get(code, |code| {
                metrics::counter!(metric::RPC_TOTAL, "service" => service, "method" => method, "code" => code_name(code))
            })
            .increment(1);
        self.seconds
            .get_or_init(|| {
                metrics::histogram!(metric::RPC_SECONDS, "service" => service, "method" => method)
            })
            .record(seconds);
    }
}

/// The [`RpcMeter`] of method `$method` of `$service` (a `const`), one
/// per call site.
macro_rules! meter {
    ($service:expr, $method:literal) => {{
        static METER: $crate::grpc::RpcMeter = $crate::grpc::RpcMeter::new($service, $method);
        &METER
    }};
}
pub(crate) use meter;

/// Runs one RPC inside a span (tenant and ids are recorded into it by the
/// adapter), counts it by service, method and code, and times it. Errors
/// become statuses here, through the one mapping in `error.rs`.
pub(crate) async fn observe<T>(
    meter: &'static RpcMeter,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!(
        "rpc",
        service = meter.service,
        method = meter.method,
        tenant = tracing::field::Empty,
        id = tracing::field::Empty
    );
    let mut unfinished = Unfinished {
        meter,
        started: Instant::now(),
        ended: false,
    };
    let result = fut.instrument(span.clone()).await;
    unfinished.ended = true;
    let result = span.in_scope(|| result.map(Response::new).map_err(Status::from));
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    meter.record(code, unfinished.started.elapsed().as_secs_f64());
    result
}

/// An RPC on its way, counted as CANCELLED if it never ends: its future
/// is dropped when its caller leaves (the deadline it sent passed, its
/// client reset the stream), and nothing after the `await` above runs. A
/// stampede whose checkouts give up would otherwise leave no trace in
/// `holdfast_rpc_total` (deploy/BENCHMARKS.md, "a stampede past the
/// peak").
struct Unfinished {
    meter: &'static RpcMeter,
    started: Instant,
    ended: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.ended {
            let seconds = self.started.elapsed().as_secs_f64();
            self.meter.record(Code::Cancelled, seconds);
        }
    }
}

/// Records the caller's tenant and the call's main id on the RPC's span.
pub(crate) fn record_ids(tenant: &crate::domain::TenantId, id: &str) {
    let span = tracing::Span::current();
    span.record("tenant", tenant.as_str());
    span.record("id", id);
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
