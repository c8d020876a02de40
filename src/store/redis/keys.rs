//! The Redis keys the Rust side builds as a whole: a tenant's prefix, and
//! the few keys it reads or writes directly (the event stream, the refill
//! and expiry indexes, the recovery marker).
//!
//! Keys carry the tenant as a Redis Cluster hash tag (`hf:{acme}:...`), so
//! everything one tenant's batch touches lives in one slot and one script
//! call. The Lua scripts build the per-hold and per-pool keys from the
//! tenant prefix themselves (`lua/lib.lua` lists every key); a customer's
//! counter is a suffix the caller names (`CustomerLimit::key`).

use crate::domain::TenantId;

/// Builds key names under a configurable global prefix (default `hf`), so
/// that several holdfast instances, or tests, can share one Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (no trailing colon).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The global prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix of every key of one tenant, `<prefix>:{<tenant>}:`,
    /// passed to every script as `ARGV[1]`.
    pub fn tenant(&self, tenant: &TenantId) -> String {
        format!("{}:{{{}}}:", self.prefix, tenant)
    }

    /// The tenant's event stream.
    pub fn events(&self, tenant: &TenantId) -> String {
        format!("{}events", self.tenant(tenant))
    }

    /// The set of the tenant's pools that asked for a refill.
    pub fn refill(&self, tenant: &TenantId) -> String {
        format!("{}refill", self.tenant(tenant))
    }

    /// The tenant's expiry index of an older build's holds, by bucket
    /// (`lua/lib.lua`).
    pub fn due(&self, tenant: &TenantId) -> String {
        format!("{}due", self.tenant(tenant))
    }

    /// The tenant's expiry index, by bucket, of the holds whose units go
    /// back a bucket at a time (`lua/lib.lua`).
    pub fn xdue(&self, tenant: &TenantId) -> String {
        format!("{}xdue", self.tenant(tenant))
    }

    /// The tenant's expiry index from before buckets, by hold.
    pub fn legacy_expiry(&self, tenant: &TenantId) -> String {
        format!("{}exp", self.tenant(tenant))
    }

    /// The marker this daemon leaves in Redis: gone means Redis came back
    /// empty (or is another Redis).
    pub fn marker(&self) -> String {
        format!("{}:marker", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_keys_share_one_hash_tag() {
        let keys = Keys::new("hf");
        let t = TenantId::parse("acme").unwrap();
        assert_eq!(keys.tenant(&t), "hf:{acme}:");
        assert_eq!(keys.events(&t), "hf:{acme}:events");
        assert_eq!(keys.refill(&t), "hf:{acme}:refill");
        assert_eq!(keys.due(&t), "hf:{acme}:due");
        assert_eq!(keys.legacy_expiry(&t), "hf:{acme}:exp");
        assert_eq!(keys.marker(), "hf:marker");
    }
}
