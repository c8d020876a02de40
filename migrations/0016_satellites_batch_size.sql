-- Most webhooks a satellite is sent in one request. 1 (every satellite
-- before this migration, and the default) sends each alone to
-- `<base_url>/webhooks/<event>`; more sends a satellite with a backlog
-- up to that many rows in order, in one POST to `<base_url>/webhooks`,
-- so that a satellite far from the daemon is told of that many changes a
-- round trip rather than one (deploy/BENCHMARKS.md, "a satellite far
-- away"). A constant default: adding the column rewrites nothing.
ALTER TABLE satellites ADD COLUMN batch_size integer NOT NULL DEFAULT 1
    CHECK (batch_size BETWEEN 1 AND 100);
