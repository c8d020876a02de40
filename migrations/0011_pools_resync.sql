-- Pools whose units the Postgres fallback gave back (a hold that expired,
-- was released, or was undone as a twin of one Redis served) since Redis
-- last heard about them: Redis may still say the pool is full, and would
-- answer sold out while Postgres has units to grant. The refiller brings
-- each marked pool's Redis copy up to date and clears the mark.
ALTER TABLE pools ADD COLUMN resync boolean NOT NULL DEFAULT false;
CREATE INDEX pools_resync ON pools (tenant, pool_id) WHERE resync;
