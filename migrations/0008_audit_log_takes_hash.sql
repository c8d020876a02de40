-- The audit log's hold-id index serves one query: the fallback asking
-- whether Redis already served an id it is about to take
-- (store/postgres/fallback/take.rs), which names only `reserved` and
-- `claimed` rows and looks ids up by equality. A B-tree over every row's
-- (tenant, hold_id) cost each drained event ~6.5 µs of Postgres execution;
-- a hash index over the takes alone costs a take ~3 µs and every other
-- event (commit, release, expiry) nothing (deploy/BENCHMARKS.md, "What
-- an audit row costs"). The tenant is checked on the row.
--
-- On a large audit log this CREATE INDEX holds writes to the table while it
-- builds; the drainer waits, and Redis keeps serving meanwhile.
DROP INDEX IF EXISTS audit_log_hold;
CREATE INDEX audit_log_takes ON audit_log USING hash (hold_id)
    WHERE kind IN ('reserved', 'claimed');
