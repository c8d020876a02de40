-- set_listings.lua: writes cards' listing state on one channel into the
-- mirror, unless the mirror already holds a newer state
-- (src/services/listing_mirror.rs).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 channel
--       5 version from Postgres's `listing_version` sequence (> 0), taken
--         while the change held the listing rows
--       6 '1' when the cards are live there now, '0' when not
--       7.. card ids
-- Returns how many cards' entries changed (the others held a newer one).

local channel, version = ARGV[4], tonumber(ARGV[5])
local value = version
if ARGV[6] ~= '1' then
  value = -version
end
local changed = 0
for i = 7, #ARGV do
  local key = P .. 'listed:' .. ARGV[i]
  local cur = tonumber(redis.call('HGET', key, channel) or '0')
  if math.abs(cur) < version then
    redis.call('HSET', key, channel, value)
    changed = changed + 1
  end
end
return changed
