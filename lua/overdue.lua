-- overdue.lua: how many ACTIVE holds with ids starting with ARGV[5] were due
-- by ARGV[4] (ms) and are still not finalised. A check for the fault suite
-- and the bench's expiry probe (the sweeper's promise: none lingers), not a
-- hot-path call: it reads every bucket of both expiry indexes due by then.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 due by, ms
--       5 hold id prefix ("" for every hold)
-- Returns the count.

local before, id_prefix = tonumber(ARGV[4]), ARGV[5]
local seen, n = {}, 0
for _, index in ipairs({ 'due', 'xdue' }) do
  for _, b in ipairs(redis.call('ZRANGEBYSCORE', P .. index, '-inf', before)) do
    for _, id in ipairs(redis.call('LRANGE', P .. index .. ':' .. b, 0, -1)) do
      if not seen[id] and string.sub(id, 1, #id_prefix) == id_prefix then
        seen[id] = true
        local h = redis.call('HMGET', P .. 'hold:' .. id, 'st', 'exp')
        if live(h[1]) and tonumber(h[2]) <= before then
          n = n + 1
        end
      end
    end
  end
end
return n
