-- grant.lua: record in Redis the share of a pool that Postgres delegated to
-- it (ESCROW.md, "Refill": Postgres commits first, this follows).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms (see lib.lua)
--       3 pool id
--       4 epoch of the grant
--       5 granted: the cumulative units Postgres delegated in that epoch
--       6 full: "1" when nothing is left to delegate (Redis may then answer
--         sold out on its own), else "0"
--       7 unlimited: "1" or "0"
--       8 sale window start, ms (0: none); 9 end, ms (0: none)
--       10 low-stock threshold (-1: none)
--       11 ceiling on sold + held (-1: none)
--       12 low-water mark: headroom at which a take asks for a refill
--       13 units Postgres still has to grant after this grant
-- Returns { 'LOADED' } when the pool was new here (or of an older epoch,
--       which is dropped), { 'GRANTED', grant } when the grant was raised
--       (never lowered: a late or repeated call is harmless), or
--       { 'STALE', epoch } when Redis already runs a newer epoch.

local pk = P .. 'pool:' .. ARGV[3]
local epoch, granted = tonumber(ARGV[4]), tonumber(ARGV[5])

local cur = redis.call('HMGET', pk, 'epoch', 'grant')
if cur[1] and tonumber(cur[1]) > epoch then
  return { 'STALE', cur[1] }
end
if not cur[1] or tonumber(cur[1]) < epoch then
  redis.call('DEL', pk)
  redis.call('HSET', pk, 'grant', granted, 'ret', 0, 'sold', 0, 'held', 0, 'epoch', epoch,
    'full', ARGV[6], 'unl', ARGV[7], 'from', ARGV[8], 'until', ARGV[9], 'low', ARGV[10], 'armed', 1, 'lim', ARGV[11], 'lw', ARGV[12], 'pgf', ARGV[13])
  check_low(ARGV[3], now_ms())
  return { 'LOADED' }
end
local grant = math.max(tonumber(cur[2]), granted)
redis.call('HSET', pk, 'grant', grant, 'full', ARGV[6], 'unl', ARGV[7], 'from', ARGV[8], 'until', ARGV[9],
  'low', ARGV[10], 'lim', ARGV[11], 'lw', ARGV[12], 'pgf', ARGV[13])
check_low(ARGV[3], now_ms())
return { 'GRANTED', tostring(grant) }
