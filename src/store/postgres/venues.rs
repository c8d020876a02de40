//! Venues and their schedules (time-window slots).

use chrono::NaiveDate;

use super::PgStore;
use crate::domain::TenantId;
use crate::error::Error;

/// A venue's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VenueRow {
    /// The venue.
    pub venue_id: String,
    /// IANA time zone name.
    pub time_zone: String,
    /// Window length.
    pub window_minutes: u32,
}

/// A venue's schedule as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleRows {
    /// (ISO weekday, local hour, slots per hour).
    pub weekly: Vec<(u32, u32, u32)>,
    /// (local date, hour or -1 for closed all day, slots per hour).
    pub overrides: Vec<(NaiveDate, i32, u32)>,
}

fn to_u32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl PgStore {
    /// Creates or updates a venue.
    pub async fn upsert_venue(&self, tenant: &TenantId, v: &VenueRow) -> Result<(), Error> {
        self.ensure_tenant(tenant).await?;
        sqlx::query(
            "INSERT INTO venues (tenant, venue_id, time_zone, window_minutes) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, venue_id) DO UPDATE SET time_zone = $3, window_minutes = $4",
        )
        .bind(tenant.as_str())
        .bind(&v.venue_id)
        .bind(&v.time_zone)
        .bind(i32::try_from(v.window_minutes).unwrap_or(15))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Reads a venue.
    pub async fn get_venue(
        &self,
        tenant: &TenantId,
        venue_id: &str,
    ) -> Result<Option<VenueRow>, Error> {
        let row: Option<(String, i32)> = sqlx::query_as(
            "SELECT time_zone, window_minutes FROM venues WHERE tenant = $1 AND venue_id = $2",
        )
        .bind(tenant.as_str())
        .bind(venue_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(time_zone, m)| VenueRow {
            venue_id: venue_id.to_owned(),
            time_zone,
            window_minutes: to_u32(m),
        }))
    }

    /// Replaces a venue's weekly schedule.
    pub async fn set_weekly_schedule(
        &self,
        tenant: &TenantId,
        venue_id: &str,
        hours: &[(u32, u32, u32)],
    ) -> Result<(), Error> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM venue_hours WHERE tenant = $1 AND venue_id = $2")
            .bind(tenant.as_str())
            .bind(venue_id)
            .execute(&mut *tx)
            .await?;
        for (weekday, hour, slots) in hours {
            sqlx::query("INSERT INTO venue_hours (tenant, venue_id, weekday, hour, slots_per_hour) VALUES ($1, $2, $3, $4, $5)")
                .bind(tenant.as_str())
                .bind(venue_id)
                .bind(*weekday as i32)
                .bind(*hour as i32)
                .bind(i32::try_from(*slots).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces one date's override (`hours` empty: closed all day), or
    /// removes it (`None`).
    pub async fn set_date_override(
        &self,
        tenant: &TenantId,
        venue_id: &str,
        day: NaiveDate,
        hours: Option<&[(u32, u32)]>,
    ) -> Result<(), Error> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM venue_overrides WHERE tenant = $1 AND venue_id = $2 AND day = $3")
            .bind(tenant.as_str())
            .bind(venue_id)
            .bind(day)
            .execute(&mut *tx)
            .await?;
        if let Some(hours) = hours {
            let rows: Vec<(i32, i32)> = if hours.is_empty() {
                vec![(-1, 0)]
            } else {
                hours
                    .iter()
                    .map(|(h, s)| (*h as i32, i32::try_from(*s).unwrap_or(i32::MAX)))
                    .collect()
            };
            for (hour, slots) in rows {
                sqlx::query("INSERT INTO venue_overrides (tenant, venue_id, day, hour, slots_per_hour) VALUES ($1, $2, $3, $4, $5)")
                    .bind(tenant.as_str())
                    .bind(venue_id)
                    .bind(day)
                    .bind(hour)
                    .bind(slots)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Reads a venue's whole schedule.
    pub async fn schedule(&self, tenant: &TenantId, venue_id: &str) -> Result<ScheduleRows, Error> {
        let weekly: Vec<(i32, i32, i32)> =
            sqlx::query_as("SELECT weekday, hour, slots_per_hour FROM venue_hours WHERE tenant = $1 AND venue_id = $2")
                .bind(tenant.as_str())
                .bind(venue_id)
                .fetch_all(&self.pool)
                .await?;
        let overrides: Vec<(NaiveDate, i32, i32)> =
            sqlx::query_as("SELECT day, hour, slots_per_hour FROM venue_overrides WHERE tenant = $1 AND venue_id = $2")
                .bind(tenant.as_str())
                .bind(venue_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(ScheduleRows {
            weekly: weekly
                .into_iter()
                .map(|(d, h, s)| (to_u32(d), to_u32(h), to_u32(s)))
                .collect(),
            overrides: overrides
                .into_iter()
                .map(|(d, h, s)| (d, h, to_u32(s)))
                .collect(),
        })
    }

    /// The ids of pools whose id starts with `prefix` (a venue's windows).
    pub async fn pool_ids_with_prefix(
        &self,
        tenant: &TenantId,
        prefix: &str,
    ) -> Result<Vec<String>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT pool_id FROM pools WHERE tenant = $1 AND starts_with(pool_id, $2)",
        )
        .bind(tenant.as_str())
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}
