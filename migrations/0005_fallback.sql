-- The Postgres fallback: holds taken while Redis is unreachable. They are
-- sold, released and expired here, wherever later calls land. A hold whose
-- id also reached Redis (a retried in-doubt call) is a twin: the drainer
-- keeps one and marks the other 'D' (duplicate), giving its units back.

CREATE TABLE pg_holds (
    tenant       text        NOT NULL REFERENCES tenants (id),
    hold_id      text        NOT NULL,
    job          text        NOT NULL,
    state        char(1)     NOT NULL CHECK (state IN ('A', 'C', 'R', 'E', 'D')),
    request      text        NOT NULL,           -- fingerprint: a retry must match it
    lines        jsonb       NOT NULL,           -- [{"pool", "qty", "epoch": 0}]
    expires_at   timestamptz NOT NULL,
    extensions   integer     NOT NULL DEFAULT 0,
    extension_id text        NOT NULL DEFAULT '',
    reference    text        NOT NULL DEFAULT '',
    order_id     text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (tenant, hold_id)
);
CREATE INDEX pg_holds_due ON pg_holds (tenant, expires_at) WHERE state = 'A';

-- Event ids of the fallback's own audit rows ('f<n>'; Redis's are '<ms>-<seq>').
CREATE SEQUENCE fallback_event_ids;
