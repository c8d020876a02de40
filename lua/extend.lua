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

-- 1. Time, expired holds out of the way, and this hold as it is now.
local now = now_ms()
expire_due(now)
local h = current_hold(hold_id, job, now)

-- 2. Checks: an active hold, a retry, the extension budget.
if not h then
  return { 'NO_HOLD' }
end
if xid ~= '' and h[12] == xid then
  return view_of(h)
end
if not live(h[1]) then
  return { 'NOT_ACTIVE_HOLD', view_of(h) }
end
local ext = tonumber(h[5] or '0')
if ext >= max_ext then
  return { 'EXTEND_LIMIT', view_of(h) }
end

-- 3. Move the expiry, log it, answer.
local was = tonumber(h[4])
local exp = math.max(was, now + ttl)
if h[1] == 'Q' then
  exp = q_exp(exp)
end
h[4], h[5] = ms(exp), tostring(ext + 1)
redis.call('HSET', hk, 'exp', h[4], 'ext', h[5], 'xid', xid)
-- An expiry in the same bucket is found there already (lib.lua,
-- index_expiry), and counted in its sum; a Q hold's units move to the new
-- bucket's sum.
if bucket_of(exp) ~= bucket_of(was) then
  if h[1] == 'Q' then
    local lines = cjson.decode(h[3])
    count_in_bucket(was, lines, h[11], -1)
    count_in_bucket(exp, lines, h[11], 1)
    index_expiry(hold_id, exp, 'xdue')
  else
    index_expiry(hold_id, exp, 'due')
  end
end
emit(now, 'extended', job, hold_id, h[3], { 'r', h[6] or '' })
return view_of(h)
