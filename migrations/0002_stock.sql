-- Stock reservations: a low-stock threshold per pool, and stock
-- adjustments made idempotent by the caller's adjustment id.

ALTER TABLE pools
    ADD COLUMN low_stock_threshold bigint
        CHECK (low_stock_threshold IS NULL OR low_stock_threshold >= 0);

CREATE TABLE stock_adjustments (
    tenant        text   NOT NULL REFERENCES tenants (id),
    adjustment_id text   NOT NULL,
    pool_id       text   NOT NULL,
    delta         bigint NOT NULL,
    reason        text   NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, adjustment_id)
);
