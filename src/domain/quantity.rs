//! Quantities of units: positive and bounded, so no sum of a batch can
//! overflow anywhere (Lua numbers are doubles: exact up to 2^53).

use crate::error::Error;

/// A number of units, `1..=max` for the server's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(i64);

impl Quantity {
    /// Parses a requested quantity; `field` names it in errors.
    pub fn parse(field: &str, value: i64, max: i64) -> Result<Self, Error> {
        if value <= 0 {
            return Err(Error::invalid(
                field,
                format!("must be at least 1, got {value}"),
            ));
        }
        if value > max {
            return Err(Error::invalid(
                field,
                format!("must be at most {max}, got {value}"),
            ));
        }
        Ok(Self(value))
    }

    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_negative_and_over_limit_quantities_are_refused() {
        assert!(Quantity::parse("q", 0, 10).is_err());
        assert!(Quantity::parse("q", -1, 10).is_err());
        assert!(Quantity::parse("q", i64::MIN, 10).is_err());
        assert!(Quantity::parse("q", 11, 10).is_err());
        assert_eq!(Quantity::parse("q", 10, 10).unwrap().get(), 10);
    }
}
