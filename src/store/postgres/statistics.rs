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
pub const TABLES: [&str; 18] = [
    "api_keys",
    "audit_log",
    "card_channels",
    "cards",
    "channel_drift",
    "channel_settings",
    "channels",
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

/// Rows changed since the last analysis, beyond which a table is analysed
/// again: a fixed part, so that small tables are left alone, and a share
/// of the table, so that a large one is analysed about as often as it
/// changes shape (autovacuum's defaults are 50 rows and a tenth).
const STALE_ROWS: i64 = 500;
const STALE_SHARE: f64 = 0.2;

impl PgStore {
    /// Analyses those of [`TABLES`] that changed by more than
    /// `STALE_ROWS + STALE_SHARE × rows` since their last analysis (by
    /// anyone: autovacuum's count too), and returns their names. `SKIP_LOCKED`:
    /// a table that autovacuum or another daemon is analysing is left to
    /// it, not waited for.
    pub async fn refresh_statistics(&self) -> Result<Vec<String>, Error> {
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
             WHERE s.schemaname = current_schema() AND s.relname = ANY($1)
               AND s.n_mod_since_analyze > $2 + $3 * GREATEST(c.reltuples, 0)
             ORDER BY s.relname",
        )
        .bind(TABLES)
        .bind(STALE_ROWS)
        .bind(STALE_SHARE)
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
