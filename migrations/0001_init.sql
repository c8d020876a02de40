-- holdfast's system of record: tenants, pools with their escrow ledger,
-- flash sales, the append-only audit log, and API keys.

CREATE TABLE tenants (
    id         text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A pool is a capacity that holds take units from. Its capacity is split
-- between Postgres and Redis (ESCROW.md): Redis may sell only what it was
-- granted in the current epoch (granted - returned); the Postgres fallback
-- only what is left.
CREATE TABLE pools (
    tenant        text   NOT NULL REFERENCES tenants (id),
    pool_id       text   NOT NULL,
    job           text   NOT NULL,
    capacity      bigint,                      -- NULL: unlimited
    starts_at     timestamptz,                 -- sale window, if any
    ends_at       timestamptz,
    sold_pg       bigint NOT NULL DEFAULT 0,   -- sold by the Postgres fallback
    held_pg       bigint NOT NULL DEFAULT 0,   -- held by the Postgres fallback
    epoch         bigint NOT NULL DEFAULT 1,   -- Redis generation the grant belongs to
    granted       bigint NOT NULL DEFAULT 0,   -- cumulative units delegated to Redis this epoch
    returned      bigint NOT NULL DEFAULT 0,   -- cumulative units Redis handed back this epoch
    reported_sold bigint NOT NULL DEFAULT 0,   -- units Redis sold this epoch, as written back
    sold_prior    bigint NOT NULL DEFAULT 0,   -- units Redis sold in earlier epochs
    in_doubt      bigint NOT NULL DEFAULT 0,   -- units lost with a Redis epoch, unavailable until resolved
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, pool_id),
    CHECK (capacity IS NULL OR capacity >= 0),
    CHECK (sold_pg >= 0 AND held_pg >= 0 AND granted >= returned AND returned >= 0
           AND reported_sold >= 0 AND sold_prior >= 0 AND in_doubt >= 0),
    -- The escrow invariant: never more taken or delegated than exists.
    CONSTRAINT pools_escrow_within_capacity CHECK (
        capacity IS NULL
        OR sold_pg + held_pg + sold_prior + in_doubt + (granted - returned) <= capacity)
);

CREATE TABLE sales (
    tenant             text    NOT NULL REFERENCES tenants (id),
    sale_id            text    NOT NULL,
    name               text    NOT NULL,
    starts_at          timestamptz NOT NULL,
    ends_at            timestamptz NOT NULL,
    per_customer_limit integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sale_id),
    CHECK (ends_at > starts_at),
    CHECK (per_customer_limit >= 0)
);

-- The products of a sale, in the order given; each is the pool
-- 'sale/<sale_id>/<product_id>'.
CREATE TABLE sale_products (
    tenant     text    NOT NULL,
    sale_id    text    NOT NULL,
    product_id text    NOT NULL,
    position   integer NOT NULL,
    PRIMARY KEY (tenant, sale_id, product_id),
    FOREIGN KEY (tenant, sale_id) REFERENCES sales (tenant, sale_id)
);

-- One row per engine event, written by the drainer exactly once (the
-- unique stream entry id), in the same transaction as its effects.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    tenant      text        NOT NULL,
    event_id    text        NOT NULL,          -- Redis stream entry id
    kind        text        NOT NULL,          -- reserved, claimed, committed, released, expired, extended
    job         text        NOT NULL,          -- flash, stock, lock, slot
    hold_id     text        NOT NULL,
    lines       jsonb       NOT NULL,          -- [{"pool": ..., "qty": ..., "epoch": ...}]
    reference   text        NOT NULL DEFAULT '',
    order_id    text        NOT NULL DEFAULT '',
    customer    text        NOT NULL DEFAULT '',
    at          timestamptz NOT NULL,          -- when it happened (Redis time)
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, event_id)
);
CREATE INDEX audit_log_hold ON audit_log (tenant, hold_id);
CREATE INDEX audit_log_lines ON audit_log USING gin (lines jsonb_path_ops);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();

-- API keys: only a SHA-256 of the key is stored. Each key belongs to one
-- tenant and has one role.
CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,               -- the key's public prefix, for revoking
    tenant     text NOT NULL REFERENCES tenants (id),
    role       text NOT NULL CHECK (role IN ('checkout', 'admin')),
    key_hash   bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
