//! The jobs users see, each a thin adapter that translates its words
//! (sale, product, cart hold) into pools and holds. The rules live once, in
//! the engine.

pub mod channels;
pub mod flash_sale;
pub mod listing_mirror;
pub mod reservations;
pub mod sale_locks;
pub mod slots;

use crate::error::Error;

/// The engine speaks of holds; a caller of a service knows its own noun (a
/// lock, a reservation) and its own word for a sold one (completed,
/// consumed): an engine error about a hold, in those words.
fn in_words(e: Error, noun: &str, sold: &str) -> Error {
    let noun = format!("{noun} ");
    match e {
        Error::NotFound(what) => Error::NotFound(what.replacen("hold ", &noun, 1)),
        Error::FailedPrecondition(why) => {
            Error::FailedPrecondition(why.replacen("hold ", &noun, 1).replace("committed", sold))
        }
        other => other,
    }
}
