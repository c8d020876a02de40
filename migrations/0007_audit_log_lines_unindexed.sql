-- The GIN index on audit_log.lines served no query: ListAuditLog's pool
-- filter walks each row's lines with jsonb_array_elements (a pool id or a
-- prefix of one), which a jsonb_path_ops index cannot answer. Every
-- drained event still paid to update it, and the drainer writes one audit
-- row per event (deploy/BENCHMARKS.md, "The drainer's share").
DROP INDEX IF EXISTS audit_log_lines;
