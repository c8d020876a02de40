-- sweep.lua: finalise holds whose time is up (the sweeper's one call, and
-- what a take that answered BUSY waits for).
-- Scripts already treat an expired hold as absent; this makes the EXPIRED
-- state and its event real within the sweep interval even when no other
-- call touches the tenant.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 most holds to finalise in this call, from full buckets and from
--         the partial one each (lib.lua, the expiry index)
--       5 '1' to finalise the partial bucket's due holds too (what a take
--         that answered BUSY needs), '0' to leave them for when their
--         bucket is full (the sweeper's rounds: finding them means reading
--         every hold of the bucket)
-- Returns { finalised, still_due (1 when some may be left, else 0),
--           lag_ms_of_oldest_finalised }.

local limit, now_too = tonumber(ARGV[4]), ARGV[5] == '1'
local now = now_ms()

-- Holds made before the expiry index was bucketed (a sorted set `exp` of
-- hold id -> expiry, counted by ZCARD) move into the buckets, `limit` per
-- call, so an upgraded Redis keeps every promise within a few rounds.
local legacy = redis.call('ZRANGE', P .. 'exp', 0, limit - 1, 'WITHSCORES')
for i = 1, #legacy, 2 do
  if redis.call('HGET', P .. 'hold:' .. legacy[i], 'st') == 'A' then
    index_expiry(legacy[i], tonumber(legacy[i + 1]))
    active_add(1)
  end
  redis.call('ZREM', P .. 'exp', legacy[i])
end
local n, earliest = expire_due(now, limit)
local left = 0
if none_due and now_too then
  -- Every full bucket is done: the partial one's due holds too.
  local due = due_in_partial(now, limit)
  local m, at = finish_all(due, 'E', now, 'expired', now)
  n = n + m
  earliest = earlier(earliest, at)
  if #due >= limit then
    left = 1
  end
elseif not none_due then
  left = 1
end
local lag = 0
if earliest then
  lag = now - earliest
end
return { n, left, lag }
