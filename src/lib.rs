//! holdfast: a gRPC daemon that never sells the same unit twice.
//!
//! Storefront and checkout backends call holdfast before they take money. It
//! answers from atomic Lua scripts in Redis, keeps Postgres as the system of
//! record, and writes sold counts back to Postgres in the background.
//!
//! # Module map
//!
//! Dependencies point inward: `grpc` and `jobs` use the `engine` and the
//! `services`; those use the `domain` and the `store`s; the `domain` uses
//! nothing of ours.
//!
//! - [`domain`]: pools, holds, ids, quantities and outcomes. No I/O.
//! - [`store`]: Redis (the fast path: keys, Lua scripts, the coalescer that
//!   sends concurrent hold operations as one call, strict reply decoding) and
//!   Postgres (pools and their escrow ledger, the fallback's takes and their
//!   coalescer, sales, venues, cards and their channel listings, the audit
//!   log, the outbox, API keys).
//! - [`engine`]: the hold engine's use cases: reserve, commit, release,
//!   extend, claim, reads; it grants Redis its share of a pool on demand.
//! - [`services`]: the jobs users see (flash sales, ...) translated into
//!   pools and holds.
//! - [`grpc`]: generated code, request parsing, one thin adapter per service,
//!   and authentication.
//! - [`jobs`]: background loops: the drainer (Redis events to Postgres,
//!   with their channel changes), the sweeper (expired holds), the outbox
//!   (signed webhooks to satellites), the reconciler (satellites'
//!   canonical card lists), the refiller (grants ahead of demand), the Redis
//!   watch (closes the circuit, notices a Redis that came back empty) and
//!   the statistics job (keeps Postgres's planner statistics fresh).
//! - [`satellite`]: the HTTP client for satellites and the webhook
//!   signature.
//! - [`startup`]: [`startup::Application`] wires it all, binds the ports and
//!   runs until a shutdown signal.
//! - [`accept`]: the gRPC port's connections before HTTP/2 takes them
//!   (Nagle off, a bound on a silent connection).
//! - [`config`], [`telemetry`], [`error`], [`tls`]: the command line, logs
//!   and metrics, the one error type with its one mapping to gRPC status,
//!   and TLS for the gRPC port.
//! - [`bench`](mod@bench): `holdfast bench`, the load generator and its baselines
//!   (deploy/BENCHMARKS.md).
//! - `gate` (hidden): a TCP relay the fault tests freeze a store with.

#![warn(missing_docs)]

pub mod accept;
pub mod bench;
pub mod cache;
pub mod config;
pub mod deadline;
pub mod domain;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod gate;
pub mod grpc;
pub mod jobs;
pub mod satellite;
pub mod services;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use error::Error;
