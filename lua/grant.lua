-- grant.lua: record in Redis the share of a pool that Postgres delegated to
-- it (ESCROW.md, "Refill": Postgres commits first, this follows).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 pool id
--       5 epoch of the grant
--       6 granted: the cumulative units Postgres delegated in that epoch
--       7 full: "1" when nothing is left to delegate (Redis may then answer
--         sold out on its own), else "0"
--       8 unlimited: "1" or "0"
--       9 sale window start, ms (0: none); 10 end, ms (0: none)
--       11 low-stock threshold (-1: none)
--       12 ceiling on sold + held (-1: none)
--       13 low-water mark: headroom at which a take asks for a refill
--       14 units Postgres still has to grant after this grant
--       15 prior: the cumulative units of this epoch Postgres had already
--         delegated before this grant, which Redis must hold
--       16 reported: the units of this epoch Postgres heard Redis sell (the
--         drainer's count), which Redis's own count can never be below
-- Returns { 'LOADED' } when the pool was new here (or of an older epoch,
--       which is dropped), { 'GRANTED', grant } when the grant was raised
--       (never lowered: a late or repeated call is harmless),
--       { 'STALE', epoch } when Redis already runs a newer epoch, or
--       { 'LOST' } when Redis holds less of this epoch than `prior`, or has
--       sold less of it than `reported` (it lost data: restarted empty, or
--       an older AOF or snapshot was restored), changing
--       nothing. The check is here, not in the caller, because only this
--       script sees the pool in the same instant as it writes it: a caller
--       that read the pool before Redis restarted empty would otherwise
--       load the old epoch afresh, and Redis would sell its lost share again.

local pk = P .. 'pool:' .. ARGV[4]
local epoch, granted, prior = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[15])
local reported = tonumber(ARGV[16])

local cur = redis.call('HMGET', pk, 'epoch', 'grant', 'sold')
if cur[1] and tonumber(cur[1]) > epoch then
  return { 'STALE', cur[1] }
end
local have, sold = 0, 0
if cur[1] and tonumber(cur[1]) == epoch then
  have, sold = tonumber(cur[2]), tonumber(cur[3] or '0')
end
-- Redis restored with older data keeps the grant it had then, and its
-- sales since are gone from it: sold again, they would be sold twice.
if have < prior or sold < reported then
  return { 'LOST' }
end
if not cur[1] or tonumber(cur[1]) < epoch then
  redis.call('DEL', pk)
  redis.call('HSET', pk, 'grant', granted, 'ret', 0, 'sold', 0, 'held', 0, 'epoch', epoch,
    'full', ARGV[7], 'unl', ARGV[8], 'from', ARGV[9], 'until', ARGV[10], 'low', ARGV[11], 'armed', 1, 'lim', ARGV[12], 'lw', ARGV[13], 'pgf', ARGV[14])
  forget_pool(ARGV[4])
  check_low(ARGV[4], now_ms())
  return { 'LOADED' }
end
local grant = math.max(tonumber(cur[2]), granted)
redis.call('HSET', pk, 'grant', grant, 'full', ARGV[7], 'unl', ARGV[8], 'from', ARGV[9], 'until', ARGV[10],
  'low', ARGV[11], 'lim', ARGV[12], 'lw', ARGV[13], 'pgf', ARGV[14])
forget_pool(ARGV[4])
check_low(ARGV[4], now_ms())
return { 'GRANTED', tostring(grant) }
