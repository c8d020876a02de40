//! The domain core: pools, holds, ids, quantities and the rules' outcomes.
//!
//! Nothing here knows Redis, Postgres or gRPC. Requests are parsed into these
//! types once, at the edge; inside, a value of these types is valid.

pub mod channel;
mod event;
mod hold;
mod ids;
mod limits;
mod quantity;
mod window;

pub use channel::{CardId, Channel, ChannelSlug, ListingStatus};
pub use event::{Event, EventLine, parse_event_id};
pub use hold::{Hold, HoldState, Job, Line, Lines, Shortage, TakeOutcome};
pub use ids::{HoldId, PoolId, TenantId, parse_name};
pub use limits::{Limits, check_batch};
pub use quantity::Quantity;
pub use window::{Window, parse_zone, window_at, windows_between};
