//! Integration tests: the real daemon over real gRPC, against real Redis
//! and Postgres (started by `deploy/test.sh`). One test binary, one module
//! per area, so the suite links once.

mod helpers;

mod auth;
mod batches;
mod bench;
mod cards;
mod channels;
mod connections;
mod delivery_retention;
mod events;
mod expiry;
mod fallback;
mod flash_sale;
mod holds;
mod listing_mirror;
mod locks;
mod ops;
mod outbox;
mod pool_writers;
mod properties;
mod redelivery;
mod redis_loss;
mod reservations;
mod satellite;
mod slots;
mod statistics;
mod stock;
mod tls;
mod validation;
mod walls;
mod watch;
