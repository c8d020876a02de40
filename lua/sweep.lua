-- sweep.lua: finalise holds whose time is up (the sweeper's one call).
-- Scripts already treat an expired hold as absent; this makes the EXPIRED
-- state and its event real within the sweep interval even when no other
-- call touches the tenant.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 most holds to finalise in this call
-- Returns { finalised, still_due, lag_ms_of_oldest_finalised }.

local limit = tonumber(ARGV[4])
local now = now_ms()
local oldest = redis.call('ZRANGE', P .. 'exp', 0, 0, 'WITHSCORES')
local lag = 0
if oldest[2] and tonumber(oldest[2]) <= now then
  lag = now - tonumber(oldest[2])
end
local n = expire_due(now, limit)
local left = redis.call('ZCOUNT', P .. 'exp', '-inf', now)
return { n, left, lag }
