-- holders.lua: who holds or sold each of some capacity-1 pools (cards), so
-- a refused lock can name each conflicting card and the channel holding it.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4.. pool ids
-- Returns one entry per pool: { sold, held, holder_id, holder_state,
--       holder_ref, holder_job } (the last four '' when the pool has no
--       remembered holder, or the holder was forgotten after retention).
--       For a capacity-1 pool, while held = 1 the holder is the active hold;
--       while sold = 1 it is the hold that sold it.

expire_due(now_ms())
local out = {}
for i = 4, #ARGV do
  local p = redis.call('HMGET', P .. 'pool:' .. ARGV[i], 'sold', 'held', 'by')
  local by = p[3] or ''
  local h = { false, false, false }
  if by ~= '' then
    h = redis.call('HMGET', P .. 'hold:' .. by, 'st', 'ref', 'job')
  end
  out[#out + 1] = { p[1] or '0', p[2] or '0', by, shown(h[1] or ''), h[2] or '', h[3] or '' }
end
return out
