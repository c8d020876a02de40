-- return.lua: hand units of a pool's grant back to Postgres (ESCROW.md,
-- "Return": Redis's share shrinks, so Redis commits first; Postgres then
-- records `returned = max(returned, r)`). Used when stock is lowered.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 pool id
--       5 epoch the caller believes current
--       6 units to return
-- Returns { 'RETURNED', returned } with the new cumulative count,
--       { 'SHORT', available } when Redis has fewer free units than asked,
--       or { 'NO_POOL' } when Redis does not run this pool in that epoch.

local pool_id, epoch, k = ARGV[4], ARGV[5], tonumber(ARGV[6])

-- 1. Expired holds out of the way, then the check.
expire_due(now_ms())
local p = read_pool(pool_id)
if not p[1] or p[5] ~= epoch then
  return { 'NO_POOL' }
end
local avail = headroom_of(p)
if avail < k then
  return { 'SHORT', tostring(math.max(avail, 0)) }
end

-- 2. Give the units back. Until Postgres settles the new capacity the pool
-- is no longer "full": a take that needs more asks for a grant and waits.
local ret = pool_add(pool_id, 'ret', k)
pool_set(pool_id, 'full', '0')
return { 'RETURNED', tostring(ret) }
