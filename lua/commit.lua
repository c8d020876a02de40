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

-- 1. Time, expired holds out of the way, and this hold as it is now (read
-- once: lib.lua, HOLD_FIELDS).
local now = now_ms()
expire_due(now)
local h = current_hold(hold_id, job, now)

-- 2. Is there an active hold to commit?
if not h then
  return { 'NO_HOLD' }
end
local st = h[1]
if st == 'C' then
  local oid = h[7] or ''
  if order_id ~= '' and oid ~= '' and oid ~= order_id then
    return { 'ORDER_MISMATCH', view_of(h) }
  end
  return view_of(h)
end
if not live(st) then
  return { 'NOT_ACTIVE_HOLD', view_of(h) }
end
local ln = h[3]
local lines = cjson.decode(ln)
for _, l in ipairs(lines) do
  if read_pool(l[1])[5] ~= tostring(l[3]) then
    return { 'STALE_EPOCH', l[1] }
  end
end

-- 3. Move the units from held to sold.
for _, l in ipairs(lines) do
  pool_add(l[1], 'held', -l[2])
  pool_add(l[1], 'sold', l[2])
end
local fin = ms(now)
local fields = { 'HSET', hk, 'st', 'C', 'fin', fin }
put_unless_empty(fields, 'oid', order_id)
redis.call(unpack(fields))
redis.call('PEXPIRE', hk, RETENTION_MS)
-- Its expiry index entry stays until its bucket comes due (lib.lua); its
-- bucket's sum no longer counts it.
active_add(-1)
if st == 'Q' then
  count_in_bucket(tonumber(h[4]), lines, h[11], -1)
end

-- 4. Log it, and answer with what was read and written.
emit(now, 'committed', job, hold_id, ln, { 'r', h[6] or '', 'o', order_id, 'c', h[11] or '' })
h[1], h[9] = 'C', fin
if order_id ~= '' then
  h[7] = order_id
end
return view_of(h)
