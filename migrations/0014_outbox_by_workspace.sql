-- ListDeliveries lists one workspace's deliveries, newest first. The
-- outbox keeps every delivered row, and with no index on the workspace
-- a shop's page read every other shop's rows newer than its own: 200 ms
-- for a shop with 10 deliveries beside 2,000,000 of another's, and
-- growing for good. Each webhook row pays one more index entry for it.
-- (Built in the migration's transaction, which holds writes to the
-- outbox meanwhile: seconds for a few million rows.)
CREATE INDEX outbox_by_workspace ON outbox (workspace, id);
