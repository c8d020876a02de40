//! Identifiers. Every id that ends up inside a Redis key is restricted to
//! `[A-Za-z0-9_.-]` (tenants: `[a-z0-9_-]`), so no id can smuggle a key
//! separator (`:`), a hash-tag brace or a path separator (`/`, which joins a
//! sale and a product into a pool id) into a key.

use std::fmt;

use crate::error::Error;

/// Checks an id-like string: non-empty, at most `max` bytes, only
/// `[A-Za-z0-9_.-]`. `field` names the request field in the error.
pub fn parse_name(field: &str, value: &str, max: usize) -> Result<String, Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} characters, got {}", value.len()),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("may contain only A-Z a-z 0-9 _ . - (found {bad:?})"),
        ));
    }
    Ok(value.to_owned())
}

/// A tenant: a store or workspace. Comes from the caller's credential,
/// never from a request body.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// Longest tenant id.
    pub const MAX_LEN: usize = 64;

    /// Parses a tenant id: 1-64 characters of `[a-z0-9_-]`.
    pub fn parse(value: &str) -> Result<Self, Error> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(Error::invalid(
                "tenant",
                format!("must be 1-{} characters", Self::MAX_LEN),
            ));
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(Error::invalid("tenant", "may contain only a-z 0-9 _ -"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A hold's (or claim's) client-chosen id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HoldId(String);

impl HoldId {
    /// Parses a hold id within `max` characters; `field` names it in errors.
    pub fn parse(field: &str, value: &str, max: usize) -> Result<Self, Error> {
        parse_name(field, value, max).map(Self)
    }

    /// Wraps a hold id read back from our own stores (already valid).
    pub fn from_store(value: String) -> Self {
        Self(value)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pool's id. Services compose it from their own ids (a flash sale
/// product's pool is `sale/<sale_id>/<product_id>`), each part already
/// checked by [`parse_name`], so a pool id is always key-safe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(String);

impl PoolId {
    /// Joins already-checked parts with `/`.
    pub fn from_parts(parts: &[&str]) -> Self {
        Self(parts.join("/"))
    }

    /// Parses a pool id given whole (operators' calls): `/`-separated parts,
    /// each a valid name.
    pub fn parse(field: &str, value: &str) -> Result<Self, Error> {
        if value.len() > 200 {
            return Err(Error::invalid(field, "must be at most 200 characters"));
        }
        for part in value.split('/') {
            parse_name(field, part, 200)?;
        }
        Ok(Self(value.to_owned()))
    }

    /// Wraps a pool id read back from our own stores (already valid).
    pub fn from_store(value: String) -> Self {
        Self(value)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_a_key_separator_or_brace_is_refused() {
        for bad in ["a:b", "{t}", "a/b", "a b", "é"] {
            assert!(parse_name("x", bad, 64).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn an_empty_or_over_long_name_is_refused_naming_the_field() {
        let err = parse_name("lines[0].product_id", "", 64).unwrap_err();
        assert!(err.to_string().starts_with("lines[0].product_id"));
        assert!(parse_name("x", &"a".repeat(65), 64).is_err());
        assert!(parse_name("x", &"a".repeat(64), 64).is_ok());
    }

    #[test]
    fn tenant_ids_are_lower_case() {
        assert!(TenantId::parse("store-1").is_ok());
        assert!(TenantId::parse("Store").is_err());
        assert!(TenantId::parse("").is_err());
    }
}
