-- An operator's resolutions of units in doubt, by the caller's resolution
-- id, so that ResolveInDoubt is idempotent like every other mutating call:
-- a retry finds its resolution here and changes nothing.
CREATE TABLE in_doubt_resolutions (
    tenant        text   NOT NULL REFERENCES tenants (id),
    resolution_id text   NOT NULL,
    pool_id       text   NOT NULL,
    in_doubt      bigint NOT NULL CHECK (in_doubt >= 0),
    sold_units    bigint NOT NULL CHECK (sold_units >= 0 AND sold_units <= in_doubt),
    resolved_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, resolution_id)
);
