-- Pools with units in doubt: normally none. The in-doubt gauge summed the
-- column over every pool every 2 s on every daemon, a scan of the whole
-- table (13 ms a read at 100,000 pools under load: deploy/BENCHMARKS.md,
-- "the in-doubt gauge"); ListInDoubtPools read all of a tenant's pools.
-- Both read this index of the few pools in doubt instead.
--
-- The write-back rewrites in_doubt on every batch, but to the same value
-- unless units leave doubt, and an update that leaves an indexed column's
-- value as it was stays HOT (migration 0009).
CREATE INDEX pools_in_doubt ON pools (tenant, pool_id) INCLUDE (in_doubt) WHERE in_doubt > 0;
