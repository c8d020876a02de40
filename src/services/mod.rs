//! The jobs users see, each a thin adapter that translates its words
//! (sale, product, cart hold) into pools and holds. The rules live once, in
//! the engine.

pub mod channels;
pub mod flash_sale;
pub mod listing_mirror;
pub mod reservations;
pub mod sale_locks;
pub mod slots;
