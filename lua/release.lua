-- release.lua: give an active hold's units back. Idempotent.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 hold id
--       5 job the hold must belong to
-- Returns the hold view (state R, or E when it had already expired);
--       otherwise { 'NO_HOLD' } or { 'COMMITTED', <hold view> }.

local hold_id, job = ARGV[4], ARGV[5]

-- 1. Time, expired holds out of the way, and this hold as it is now.
local now = now_ms()
expire_due(now)
local h = current_hold(hold_id, job, now)

-- 2. Only an active hold changes; a finished one answers as it is.
if not h then
  return { 'NO_HOLD' }
end
if h[1] == 'C' then
  return { 'COMMITTED', view_of(h) }
end
if live(h[1]) then
  -- 3. Give the units back and log it.
  finish(hold_id, 'R', now, 'released')
  h[1], h[9] = 'R', ms(now)
end
return view_of(h)
