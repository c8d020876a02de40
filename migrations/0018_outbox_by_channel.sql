-- ListDeliveries pages through a workspace's deliveries by channel: each
-- channel's rows through this index (the waiting ones through
-- outbox_pending), and a page of every channel as each channel's page,
-- merged. Through outbox_by_workspace (0014) a page of one channel read
-- every other channel's rows newer than it, a page of the waiting ones
-- every acknowledged row, and a second page all of the first on a
-- reused plan. This index replaces that one, so a webhook row still pays
-- one index entry for its listing. (Built in the migration's
-- transaction, which holds writes to the outbox meanwhile: seconds for a
-- few million rows.)
CREATE INDEX outbox_by_channel ON outbox (workspace, channel, id);
DROP INDEX outbox_by_workspace;
