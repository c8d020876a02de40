-- get_hold.lua: read a hold as it stands now (an expired hold reads EXPIRED
-- even before the sweeper reaches it, because this finalises it first).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 hold id
--       5 job the hold must belong to
-- Returns the hold view, or { 'NO_HOLD' }.

expire_due(now_ms())
local h = current_hold(ARGV[4], ARGV[5], now_ms())
if not h then
  return { 'NO_HOLD' }
end
return view_of(h)
