-- get_hold.lua: read a hold as it stands now (an expired hold reads EXPIRED
-- even before the sweeper reaches it, because this finalises it first).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms (see lib.lua)
--       3 hold id
--       4 job the hold must belong to
-- Returns the hold view, or { 'NO_HOLD' }.

local hk = P .. 'hold:' .. ARGV[3]
expire_due(now_ms())
if not hold_state(hk, ARGV[4]) then
  return { 'NO_HOLD' }
end
return hold_view(hk)
