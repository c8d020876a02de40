//! The stores: Redis, the fast path that answers every hot call, and
//! Postgres, the system of record.

pub mod postgres;
pub mod redis;
