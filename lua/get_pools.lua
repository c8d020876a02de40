-- get_pools.lua: read pools' counts as they stand now (expired holds are
-- finalised first, so they are never counted as held).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4.. pool ids
-- Returns one entry per pool: {} when Redis does not have the pool, else
--       { grant, ret, sold, held, epoch, full, unl }.

expire_due(now_ms())
local out = {}
for i = 4, #ARGV do
  local p = redis.call('HMGET', P .. 'pool:' .. ARGV[i], 'grant', 'ret', 'sold', 'held', 'epoch', 'full', 'unl')
  if p[1] and p[5] then
    out[#out + 1] = p
  else
    out[#out + 1] = {}
  end
end
return out
