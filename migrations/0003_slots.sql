-- Time-window slots: venues, their weekly schedules and date overrides.
-- Each window a venue sells is a pool 'slot/<venue>/<window start, unix s>'
-- created when first used, with the capacity its schedule gives.

CREATE TABLE venues (
    tenant         text    NOT NULL REFERENCES tenants (id),
    venue_id       text    NOT NULL,
    time_zone      text    NOT NULL,            -- IANA name, checked by the daemon
    window_minutes integer NOT NULL DEFAULT 15 CHECK (window_minutes IN (5, 10, 15, 20, 30, 60)),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, venue_id)
);

-- Slots per hour for each ISO weekday (1 = Monday) and local hour.
CREATE TABLE venue_hours (
    tenant         text    NOT NULL,
    venue_id       text    NOT NULL,
    weekday        integer NOT NULL CHECK (weekday BETWEEN 1 AND 7),
    hour           integer NOT NULL CHECK (hour BETWEEN 0 AND 23),
    slots_per_hour integer NOT NULL CHECK (slots_per_hour >= 0),
    PRIMARY KEY (tenant, venue_id, weekday, hour),
    FOREIGN KEY (tenant, venue_id) REFERENCES venues (tenant, venue_id) ON DELETE CASCADE
);

-- A date's override replaces that local date's whole schedule: hours not
-- listed are closed. A row with hour -1 marks a date closed all day.
CREATE TABLE venue_overrides (
    tenant         text    NOT NULL,
    venue_id       text    NOT NULL,
    day            date    NOT NULL,
    hour           integer NOT NULL CHECK (hour BETWEEN -1 AND 23),
    slots_per_hour integer NOT NULL CHECK (slots_per_hour >= 0),
    PRIMARY KEY (tenant, venue_id, day, hour),
    FOREIGN KEY (tenant, venue_id) REFERENCES venues (tenant, venue_id) ON DELETE CASCADE
);

-- A ceiling on what a pool may have sold plus held, below its capacity:
-- a slot window whose schedule was cut below what it had already confirmed
-- keeps its confirmed slots and sells nothing more.
ALTER TABLE pools ADD COLUMN ceiling bigint CHECK (ceiling IS NULL OR ceiling >= 0);
