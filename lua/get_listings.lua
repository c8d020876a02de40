-- get_listings.lua: the listing mirror for one channel: for each card,
-- whether Postgres last said it is live there (src/services/listing_mirror.rs).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 channel
--       5.. card ids
-- Returns one entry per card: its mirrored version for the channel,
--       positive when live, negative when not, '' when never mirrored.

local out = {}
for i = 5, #ARGV do
  out[#out + 1] = redis.call('HGET', P .. 'listed:' .. ARGV[i], ARGV[4]) or ''
end
return out
