-- A resync mark now lasts until a sync has run after it. 0011's flag was
-- cleared before the sync: a daemon killed in between lost the mark, and a
-- pool Redis thought full stayed sold out while Postgres had units for it.
-- Writers count `resync_seq` up (the fallback giving units back, a capacity
-- change); the refiller reads a marked pool's count, syncs the pool, then
-- records that count in `synced_seq`. A mark made meanwhile is newer than
-- the count recorded, so the pool is synced again.
--
-- 0011's `resync` column and index stay until a later release: a daemon of
-- the build before, still running while this one starts, writes them.
ALTER TABLE pools
    ADD COLUMN resync_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN synced_seq bigint NOT NULL DEFAULT 0;
UPDATE pools SET resync_seq = 1 WHERE resync;
CREATE INDEX pools_resync_seq ON pools (tenant, pool_id) WHERE resync_seq > synced_seq;
