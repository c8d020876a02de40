//! The Redis keys the Rust side builds as a whole: a tenant's prefix and
//! its event stream.
//!
//! Keys carry the tenant as a Redis Cluster hash tag (`hf:{acme}:...`), so
//! everything one tenant's batch touches lives in one slot and one script
//! call. The Lua scripts build the per-hold and per-pool keys from the
//! tenant prefix themselves (`lua/lib.lua` lists every key); the few the
//! Rust side reads or writes directly (the refill and expiry indexes, the
//! epoch marker, a customer's counters) are suffixes of this prefix, built
//! where they are used.

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
    }
}
