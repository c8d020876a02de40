-- claim.lua: take units and sell them in one step (reserve + commit).
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 claim id (shares the hold id namespace)
--       5 job
--       6 lines as JSON: [[pool_id, qty], ...]
--       7 customer key suffix or ""
--       8 customer limit
-- Returns { 'CLAIMED', claimed_at } when claimed, or the
--       claim's hold view (state C: the same answer in full) on a repeat;
--       otherwise NEED_GRANT, NOT_ACTIVE, SHORT, CUSTOMER_LIMIT or
--       ID_REUSED (lib.lua).

local claim_id, job, lines_arg = ARGV[4], ARGV[5], ARGV[6]
local ck, limit = ARGV[7], tonumber(ARGV[8])
local hk = P .. 'hold:' .. claim_id

-- 1. Time, and expired holds out of the way.
local now = now_ms()
expire_due(now)

-- 2. A repeated id answers as the first time; then every rule.
local lines = cjson.decode(lines_arg)
local rq = take_requests(lines_arg, lines, ck, job, true)
local stop = busy_if_due(admit(claim_id, job, rq, lines, now, ck, limit), now, ck)
if stop == RECHECK then
  stop = admit(claim_id, job, rq, lines, now, ck, limit)
end
if stop then
  return stop
end

-- 3. Sell the units; remember the answer for retries.
for _, l in ipairs(lines) do
  pool_add(l[1], 'sold', l[2])
end
if ck ~= '' then
  count_customer(ck, total(lines), lines[1][1])
end
local ln = cjson.encode(lines)
-- No `exp` or `fin`: a claim ends as it is made, and both read as its
-- `cat` (lib.lua, view_of).
redis.call('HSET', hk, 'st', 'C', 'job', job, 'rq', request_digest(rq[1]), 'ln', ln, 'cat', ms(now))
redis.call('PEXPIRE', hk, RETENTION_MS)

-- 4. Log it, and answer: a new claim's answer is its time alone. The
-- caller sent its job and lines and builds the view a retry reads from
-- them (src/store/redis/reply.rs, `claim_reply`), because a flash sale
-- answers claims by the thousand a second and each element of a reply
-- costs Redis and the daemon's parser.
emit(now, 'claimed', job, claim_id, ln, { 'c', ck })
after_take(lines, now)
return { 'CLAIMED', ms(now) }
