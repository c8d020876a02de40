-- Acknowledged webhooks are kept for --delivery-retention-secs, for
-- ListDeliveries to show, then deleted oldest first by the outbox job.
-- This index finds them without reading the rows still pending (a
-- satellite down for a week keeps its backlog) or delivered recently:
-- without it a prune that finds few to delete walked the whole table.
-- Each acknowledged row pays one more index entry. (Built in the
-- migration's transaction, which holds writes to the outbox meanwhile:
-- seconds for a few million rows.)
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE state = 'delivered';
