-- The listing mirror (src/services/listing_mirror.rs): each change of a
-- card's listings takes a number from this sequence while it holds the
-- listing rows, so the copies it writes to Redis carry the order in which
-- Postgres applied the changes, and a late copy never overwrites a newer.
CREATE SEQUENCE listing_version;
