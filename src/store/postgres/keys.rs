//! API keys: only their SHA-256 is stored.

use super::PgStore;
use crate::domain::TenantId;
use crate::error::Error;

/// A key's tenant and role, found by the key's hash.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    /// The public prefix used to revoke it.
    pub key_id: String,
    /// Its tenant.
    pub tenant: String,
    /// `checkout` or `admin`.
    pub role: String,
}

impl PgStore {
    /// Stores a new key's hash.
    pub async fn insert_api_key(
        &self,
        key_id: &str,
        tenant: &TenantId,
        role: &str,
        hash: &[u8],
    ) -> Result<(), Error> {
        self.ensure_tenant(tenant).await?;
        sqlx::query(
            "INSERT INTO api_keys (key_id, tenant, role, key_hash) VALUES ($1, $2, $3, $4)",
        )
        .bind(key_id)
        .bind(tenant.as_str())
        .bind(role)
        .bind(hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Revokes a key by its id; false when there was no such live key.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<bool, Error> {
        let n = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
        )
        .bind(key_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Finds a live key by its hash.
    pub async fn find_api_key(&self, hash: &[u8]) -> Result<Option<ApiKeyRow>, Error> {
        Ok(sqlx::query_as::<_, ApiKeyRow>(
            "SELECT key_id, tenant, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?)
    }
}
