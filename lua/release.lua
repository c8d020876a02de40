-- release.lua: give an active hold's units back. Idempotent.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 hold id
--       5 job the hold must belong to
-- Returns the hold view (state R, or E when it had already expired);
--       otherwise { 'NO_HOLD' } or { 'COMMITTED', <hold view> }.

local hold_id, job = ARGV[4], ARGV[5]
local hk = P .. 'hold:' .. hold_id

-- 1. Time, and expired holds out of the way.
local now = now_ms()
expire_due(now)
expire_hold(hold_id, now)

-- 2. Only an active hold changes; a finished one answers as it is.
local st = hold_state(hk, job)
if not st then
  return { 'NO_HOLD' }
end
if st == 'C' then
  return { 'COMMITTED', hold_view(hk) }
end
if st == 'A' then
  -- 3. Give the units back and log it.
  finish(hold_id, 'R', now, 'released')
end
return hold_view(hk)
