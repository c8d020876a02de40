//! The planner's statistics of holdfast's own tables, kept fresh after a
//! burst of growth.
//!
//! Every batch statement looks rows up by tenant and a list of keys
//! (`tenant = $1 AND pool_id = ANY($2)`, `UPDATE pools ... FROM UNNEST`).
//! A table the planner last saw small (never analysed, or analysed when it
//! was) is taken for a few rows per tenant, so it plans a scan of the
//! tenant's whole range, filtered or hash-joined against the list, where an
//! index probe per key would do. Autovacuum analyses a table once a tenth
//! of it changed, but looks only once a minute, and a catalogue load or a
//! sale grows these tables by tens of thousands of rows in that minute:
//! each batch then costs as much as the tenant's rows. Measured: sold
//! cards 104 µs each under lock-complete against 9 with statistics
//! (2026-12-03); the fallback's hold look-up 2-3.5 ms a batch and its pool
//! update 10-17 ms a batch after a 10,000-product catalogue load
//! (deploy/BENCHMARKS.md, "the fallback on every workload").

use super::PgStore;
use crate::error::Error;

/// Every table holdfast's migrations create (the API test
/// `statistics::every_table_is_watched` checks the list against them).
pub const TABLES: [&str; 19] = [
    "api_keys",
    "audit_log",
    "card_channels",
    "cards",
    "channel_drift",
    "channel_settings",
    "channels",
    "in_doubt_resolutions",
    "outbox",
    "pg_holds",
    "pools",
    "sale_products",
    "sales",
    "satellites",
    "stock_adjustments",
    "tenants",
    "venue_hours",
    "venue_overrides",
    "venues",
];

/// A table is analysed once it holds more than `GROWN_ROWS` rows beyond
/// `GROWTH` times what its last analysis counted (none, if it never had
/// one): each time it doubles. What the plans above need is an analysis
/// of a table that has grown (the tenant's share of it); after that the
/// planner scales its row counts to the table's pages. Growth, not
/// changes: the write-back updates every pool it sells from (under
/// claim-10k, 10,000 pools take 14,000 updates a second), and counting
/// changes (`n_mod_since_analyze`, what autovacuum counts) against a
/// fifth or all of a table cost claim-10k 4-9 µs of Postgres CPU a claim,
/// 3 pairs by turns each (deploy/BENCHMARKS.md, "the fallback on every
/// workload").
const GROWN_ROWS: f64 = 500.0;
const GROWTH: f64 = 2.0;

impl PgStore {
    /// Analyses those of [`TABLES`] that grew past `GROWN_ROWS + GROWTH ×`
    /// the rows their last analysis counted, and returns their names.
    /// `SKIP_LOCKED`: a table that autovacuum or another daemon is
    /// analysing is left to it, not waited for.
    pub async fn refresh_statistics(&self) -> Result<Vec<String>, Error> {
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
             WHERE s.schemaname = current_schema() AND s.relname = ANY($1)
               AND s.n_live_tup > $2 + $3 * GREATEST(c.reltuples, 0)
             ORDER BY s.relname",
        )
        .bind(TABLES)
        .bind(GROWN_ROWS)
        .bind(GROWTH)
        .fetch_all(&self.pool)
        .await?;
        if !stale.is_empty() {
            // The names come from TABLES, never from a caller.
            sqlx::query(&format!("ANALYZE (SKIP_LOCKED) {}", stale.join(", ")))
                .execute(&self.pool)
                .await?;
        }
        Ok(stale)
    }
}
