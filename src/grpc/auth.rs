//! Authentication: who is calling, for which tenant, with which role.
//!
//! Callers send `authorization: Bearer <key>`. A key is `hf_<id>_<secret>`;
//! only its SHA-256 is stored (Postgres, or given by configuration). The
//! tenant always comes from the key, never from a request body, so every
//! Redis key and every query of a call is confined to the key's tenant. In
//! development mode (`--dev`) there are no keys: every call acts for the
//! tenant "dev" as admin.

use std::collections::HashMap;
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::Request;

use crate::cache::Cache;
use crate::domain::TenantId;
use crate::error::Error;
use crate::store::postgres::PgStore;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Claim, reserve, commit, release, extend, lock: a checkout backend.
    Checkout,
    /// Everything a checkout key may, plus defining sales, pools and stock.
    Admin,
}

impl Role {
    /// Parses `checkout` or `admin`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "checkout" => Some(Role::Checkout),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Checkout => "checkout",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant every call of this caller is confined to.
    pub tenant: TenantId,
    /// What it may do.
    pub role: Role,
}

/// The tenant of development mode.
pub const DEV_TENANT: &str = "dev";

/// How long a key found in Postgres is trusted before it is looked up
/// again: a revoked key stops working within this long.
const CACHE_TTL: Duration = Duration::from_secs(5);

/// Stored keys cached at most; past it the cache starts over.
const KEYS_CACHED: usize = 100_000;

type KeyHash = [u8; 32];

/// Checks credentials.
pub struct Auth {
    mode: Mode,
}

enum Mode {
    Dev(Caller),
    Keys {
        configured: HashMap<KeyHash, Caller>,
        pg: PgStore,
        /// Keys found in Postgres; a key missing or stale is looked up
        /// once however many calls bring it (src/cache.rs).
        cache: Cache<KeyHash, Caller>,
    },
}

impl Auth {
    /// Development mode: no keys, one tenant.
    pub fn dev() -> Self {
        Self {
            mode: Mode::Dev(Caller {
                tenant: TenantId::parse(DEV_TENANT).expect("a valid tenant id"),
                role: Role::Admin,
            }),
        }
    }

    /// Keys from configuration (`TENANT:ROLE:KEY` each) and from Postgres.
    pub fn keys(configured: &[String], pg: PgStore) -> Result<Self, Error> {
        let mut map = HashMap::new();
        for (i, spec) in configured.iter().enumerate() {
            let mut parts = spec.splitn(3, ':');
            let (Some(tenant), Some(role), Some(key)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(Error::invalid(
                    format!("api_keys[{i}]"),
                    "must be TENANT:ROLE:KEY",
                ));
            };
            let tenant = TenantId::parse(tenant)?;
            let role = Role::parse(role).ok_or_else(|| {
                Error::invalid(format!("api_keys[{i}]"), "role must be checkout or admin")
            })?;
            if key.len() < 16 {
                return Err(Error::invalid(
                    format!("api_keys[{i}]"),
                    "key must be at least 16 characters",
                ));
            }
            map.insert(hash_key(key), Caller { tenant, role });
        }
        Ok(Self {
            mode: Mode::Keys {
                configured: map,
                pg,
                cache: Cache::new(CACHE_TTL, KEYS_CACHED),
            },
        })
    }

    /// The tenants named by configured keys (and the dev tenant), so they
    /// can be created in Postgres at start.
    pub fn configured_tenants(&self) -> Vec<TenantId> {
        match &self.mode {
            Mode::Dev(c) => vec![c.tenant.clone()],
            Mode::Keys { configured, .. } => {
                let mut t: Vec<TenantId> = configured.values().map(|c| c.tenant.clone()).collect();
                t.sort();
                t.dedup();
                t
            }
        }
    }

    /// `check`, then records the caller's tenant and the call's
    /// main `id` on the RPC's span, for logs and traces.
    pub async fn caller<T>(&self, req: &Request<T>, need: Role, id: &str) -> Result<Caller, Error> {
        let caller = self.check(req, need).await?;
        super::record_ids(&caller.tenant, id);
        Ok(caller)
    }

    /// Authenticates a request and checks that its role allows `need`.
    async fn check<T>(&self, req: &Request<T>, need: Role) -> Result<Caller, Error> {
        let caller = match &self.mode {
            Mode::Dev(caller) => caller.clone(),
            Mode::Keys {
                configured,
                pg,
                cache,
            } => {
                let key = bearer(req)?;
                let hash = hash_key(key);
                match configured.get(&hash) {
                    Some(c) => c.clone(),
                    None => cache.get_or_load(&hash, || stored_key(pg, &hash)).await?,
                }
            }
        };
        if caller.role < need {
            return Err(Error::PermissionDenied(format!(
                "this call needs the {} role; the key has {}",
                need.as_str(),
                caller.role.as_str()
            )));
        }
        Ok(caller)
    }
}

/// The caller a key stored in Postgres names.
async fn stored_key(pg: &PgStore, hash: &KeyHash) -> Result<Caller, Error> {
    let row = pg
        .find_api_key(hash)
        .await?
        .ok_or_else(|| Error::Unauthenticated("unknown or revoked API key".into()))?;
    Ok(Caller {
        tenant: TenantId::parse(&row.tenant)?,
        role: Role::parse(&row.role)
            .ok_or_else(|| Error::internal("stored key has an unknown role"))?,
    })
}

fn bearer<T>(req: &Request<T>) -> Result<&str, Error> {
    let value = req.metadata().get("authorization").ok_or_else(|| {
        Error::Unauthenticated(
            "missing authorization metadata: send `authorization: Bearer <key>`".into(),
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| Error::Unauthenticated("authorization metadata is not text".into()))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Error::Unauthenticated("authorization must be `Bearer <key>`".into()))
}

fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Makes a new key: `(key_id, full key, hash to store)`.
pub fn new_key() -> (String, String, KeyHash) {
    let mut rng = rand::rng();
    let mut id = [0u8; 4];
    let mut secret = [0u8; 24];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let key_id = hex(&id);
    let key = format!("hf_{key_id}_{}", hex(&secret));
    let hash = hash_key(&key);
    (key_id, key, hash)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_hashes_to_what_is_stored() {
        let (id, key, hash) = new_key();
        assert!(key.starts_with(&format!("hf_{id}_")));
        assert_eq!(hash_key(&key), hash);
    }

    #[test]
    fn admin_outranks_checkout() {
        assert!(Role::Admin > Role::Checkout);
    }
}
