-- Sale locks and channels: where each card is live, the channel registry
-- of each workspace (the tenant), satellites that receive webhooks, the
-- webhook outbox, and the drift found by reconciling with satellites.
--
-- A sale lock itself lives in Redis as a hold over the card's pool
-- 'card/<card_id>' (capacity 1); its completion reaches these tables
-- through the drainer, in the same transaction as the audit row of the
-- commit event (exactly once by event id).

-- The channels a workspace can list cards on, seeded on first use.
CREATE TABLE channels (
    workspace  text    NOT NULL REFERENCES tenants (id),
    slug       text    NOT NULL,
    name       text    NOT NULL,
    exclusive  boolean NOT NULL DEFAULT false,   -- a card live here is live nowhere else
    for_sale   boolean NOT NULL DEFAULT true,    -- false for 'personal'
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, slug)
);

CREATE TABLE channel_settings (
    workspace    text    PRIMARY KEY REFERENCES tenants (id),
    dual_listing boolean NOT NULL DEFAULT false,   -- may non-exclusive channels list one card together?
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A channel's satellite: where its webhooks go, and the secret they are
-- signed with (kept here because signing needs it; never logged).
CREATE TABLE satellites (
    workspace  text NOT NULL,
    channel    text NOT NULL,
    base_url   text NOT NULL,
    secret     text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, channel),
    FOREIGN KEY (workspace, channel) REFERENCES channels (workspace, slug)
);

-- Every card a workspace has engaged, and whether it is sold. Engage locks
-- these rows (in card id order) so concurrent batches on one card queue.
CREATE TABLE cards (
    workspace     text NOT NULL REFERENCES tenants (id),
    card_id       text NOT NULL,
    sold_channel  text,
    sold_lock_ref text,
    sold_at       timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, card_id)
);

CREATE TABLE card_channels (
    id            bigserial PRIMARY KEY,
    workspace     text NOT NULL,
    card_id       text NOT NULL,
    channel       text NOT NULL,
    status        text NOT NULL CHECK (status IN ('active', 'inactive', 'sold')),
    external_ref  text NOT NULL DEFAULT '',
    metadata      jsonb NOT NULL DEFAULT '{}',
    engaged_at    timestamptz NOT NULL DEFAULT now(),
    disengaged_at timestamptz,
    UNIQUE (workspace, card_id, channel),
    FOREIGN KEY (workspace, card_id) REFERENCES cards (workspace, card_id),
    FOREIGN KEY (workspace, channel) REFERENCES channels (workspace, slug)
);
-- A card is sold once, on one channel.
CREATE UNIQUE INDEX card_channels_sold_once ON card_channels (workspace, card_id) WHERE status = 'sold';
CREATE INDEX card_channels_active ON card_channels (workspace, channel) WHERE status = 'active';

-- Webhooks to satellites, written in the transaction of the change they
-- announce and delivered by the outbox job until a 2xx. The body is fixed
-- at insert, so every retry sends the same bytes (the signature covers a
-- fresh timestamp each time).
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    workspace       text NOT NULL,
    channel         text NOT NULL,
    event           text NOT NULL,                -- bulk-disengage, engage, disengage
    body            text NOT NULL,                -- JSON, as sent
    card_count      integer NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,                      -- HTTP status of the last attempt, if any
    last_error      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX outbox_pending ON outbox (workspace, channel, id) WHERE state = 'pending';

-- What reconciling a channel with its satellite found.
CREATE TABLE channel_drift (
    id          bigserial PRIMARY KEY,
    workspace   text NOT NULL,
    channel     text NOT NULL,
    card_id     text NOT NULL,
    direction   text NOT NULL CHECK (direction IN ('missing_on_satellite', 'unknown_to_holdfast')),
    cleared     boolean NOT NULL,                 -- holdfast changed its own row to match
    detected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX channel_drift_workspace ON channel_drift (workspace, id);
