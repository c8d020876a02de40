-- restore.lua: remembers again holds Redis lost with its data, as the
-- audit log has them (src/store/redis/restore.rs), so that a retried take
-- of such an id answers as the first time and another request under it is
-- ID_REUSED, instead of taking again, and what they sold counts against
-- their customers' limits again. Only holds that ended: one live at the
-- loss has its units in doubt, and is not written back.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4.. twelve per hold: id, kind ('claim' or 'hold'), job, its lines
--       as the take sent them ([[pool_id, qty], ...]), its lines with
--       their epochs ([[pool_id, qty, epoch], ...]), customer key suffix
--       or '', state (C, R or E), created ms, finished ms, order id,
--       reference, extensions
-- Returns how many holds were written: an id Redis has (a later take, or
--       another daemon's restore) is left as it is, and one whose
--       retention has run out is not written.

local now = now_ms()
local written = 0
for i = 4, #ARGV, 12 do
  local id, kind, job, sent, ln, ck, st, cat, fin, oid, ref, ext = unpack(ARGV, i, i + 11)
  local hk = P .. 'hold:' .. id
  local left = tonumber(fin) + tonumber(RETENTION_MS) - now
  if left > 0 and redis.call('EXISTS', hk) == 0 then
    -- The request digest exactly as the take made it, from the lines it
    -- sent.
    local lines = cjson.decode(sent)
    local rq = take_requests(sent, lines, ck, job, kind == 'claim')
    local fields = { 'HSET', hk, 'st', st, 'job', job, 'rq', request_digest(rq[1]), 'ln', ln, 'cat', cat }
    -- A claim keeps neither its expiry nor its end (lib.lua, view_of).
    if kind ~= 'claim' then
      put_unless_empty(fields, 'exp', fin)
      put_unless_empty(fields, 'fin', fin)
      put_unless_empty(fields, 'oid', oid)
      put_unless_empty(fields, 'ref', ref)
      put_unless_empty(fields, 'ext', ext)
    end
    redis.call(unpack(fields))
    redis.call('PEXPIRE', hk, left)
    -- What it sold still counts against its customer's limit (the counter
    -- was lost with it); what was given back no longer did.
    if ck ~= '' and st == 'C' then
      if customer_had[ck] == nil then
        customer_had[ck] = redis.call('EXISTS', P .. ck) == 1
      end
      count_customer(ck, total(lines), lines[1][1])
    end
    written = written + 1
  end
end
return written
