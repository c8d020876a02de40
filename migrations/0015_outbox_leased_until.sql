-- Until when a delivery is claimed for an attempt in flight. A claim
-- moves `next_attempt_at` to the lease's end, and a failed attempt moves
-- it to the retry, so that column alone cannot tell an attempt in flight
-- from a satellite's backoff. RetryDeliveries brings a backoff forward
-- and must leave a lease alone: the row would be sent twice at once, and
-- the second copy could reach the satellite after the rows behind it.
-- A failed attempt clears it. (No default: adding the column rewrites
-- nothing.)
ALTER TABLE outbox ADD COLUMN leased_until timestamptz;
