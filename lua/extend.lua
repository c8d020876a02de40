-- extend.lua: move an active hold's expiry, a bounded number of times.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 hold id
--       5 job the hold must belong to
--       6 new time to live from now, ms (never shortens the hold)
--       7 most extensions allowed for this hold
--       8 extension id: a retry with the id of the last extension answers
--         as the first time instead of counting as another extension
-- Returns the hold view; otherwise { 'NO_HOLD' },
--       { 'NOT_ACTIVE_HOLD', <hold view> } (committed, released or expired)
--       or { 'EXTEND_LIMIT', <hold view> }.

local hold_id, job, ttl, max_ext, xid = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local hk = P .. 'hold:' .. hold_id

-- 1. Time, and expired holds out of the way.
local now = now_ms()
expire_due(now)
expire_hold(hold_id, now)

-- 2. Checks: an active hold, a retry, the extension budget.
local h = redis.call('HMGET', hk, 'st', 'ext', 'xid', 'exp', 'job', 'ln', 'ref')
if not h[1] or h[5] ~= job then
  return { 'NO_HOLD' }
end
if xid ~= '' and h[3] == xid then
  return hold_view(hk)
end
if h[1] ~= 'A' then
  return { 'NOT_ACTIVE_HOLD', hold_view(hk) }
end
local ext = tonumber(h[2] or '0')
if ext >= max_ext then
  return { 'EXTEND_LIMIT', hold_view(hk) }
end

-- 3. Move the expiry, log it, answer.
local exp = math.max(tonumber(h[4]), now + ttl)
redis.call('HSET', hk, 'exp', exp, 'ext', ext + 1, 'xid', xid)
-- An expiry in the same bucket is found there already (lib.lua, index_expiry).
if bucket_of(exp) ~= bucket_of(tonumber(h[4])) then
  index_expiry(hold_id, exp)
end
emit(now, 'extended', h[5], hold_id, h[6], { 'r', h[7] or '' })
return hold_view(hk)
