-- commit.lua: sell the units of an active hold.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 hold id
--       5 job the hold must belong to
--       6 order id, or "" (stock reservations are consumed by an order; a
--         consumed hold refuses a different order id)
-- Returns the hold view (state C) when committed now or before with the
--       same order id; otherwise
--       { 'NO_HOLD' }                        unknown (or forgotten) hold id, or another job's
--       { 'NOT_ACTIVE_HOLD', <hold view> }  released or expired
--       { 'ORDER_MISMATCH', <hold view> }   committed under another order id
--       { 'STALE_EPOCH', pool_id }           a pool was reloaded after a loss

local hold_id, job, order_id = ARGV[4], ARGV[5], ARGV[6]
local hk = P .. 'hold:' .. hold_id

-- 1. Time, and expired holds out of the way (this one too, if its time is up).
local now = now_ms()
expire_due(now)
expire_hold(hold_id, now)

-- 2. Is there an active hold to commit?
local st = hold_state(hk, job)
if not st then
  return { 'NO_HOLD' }
end
if st == 'C' then
  local oid = redis.call('HGET', hk, 'oid') or ''
  if order_id ~= '' and oid ~= '' and oid ~= order_id then
    return { 'ORDER_MISMATCH', hold_view(hk) }
  end
  return hold_view(hk)
end
if st ~= 'A' then
  return { 'NOT_ACTIVE_HOLD', hold_view(hk) }
end
local ln = redis.call('HGET', hk, 'ln')
local lines = cjson.decode(ln)
for _, l in ipairs(lines) do
  if redis.call('HGET', P .. 'pool:' .. l[1], 'epoch') ~= tostring(l[3]) then
    return { 'STALE_EPOCH', l[1] }
  end
end

-- 3. Move the units from held to sold.
for _, l in ipairs(lines) do
  local pk = P .. 'pool:' .. l[1]
  redis.call('HINCRBY', pk, 'held', -l[2])
  redis.call('HINCRBY', pk, 'sold', l[2])
end
local fields = { 'HSET', hk, 'st', 'C', 'fin', ms(now) }
put_unless_empty(fields, 'oid', order_id)
redis.call(unpack(fields))
redis.call('PEXPIRE', hk, RETENTION_MS)
-- Its expiry index entry stays until its bucket comes due (lib.lua).
redis.call('DECR', P .. 'active')

-- 4. Log it, and answer.
local h = redis.call('HMGET', hk, 'job', 'ref', 'ck')
emit(now, 'committed', h[1], hold_id, ln, { 'r', h[2] or '', 'o', order_id, 'c', h[3] or '' })
return hold_view(hk)
