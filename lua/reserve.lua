-- reserve.lua: hold units from one or more pools, all-or-nothing.
--
-- KEYS  none are named up front: every key is built from the tenant prefix in
--       ARGV[1], so all of them share the tenant's hash slot.
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 hold id
--       5 job ("flash", "stock", "lock", "slot")
--       6 time to live, ms
--       7 lines as JSON: [[pool_id, qty], ...] (validated by the caller)
--       8 customer key suffix ("cust:<scope>:<customer>") or ""
--       9 customer limit (ignored when 8 is "")
--       10 reference (cart, session) or ""
--       11 most active holds the tenant may have (a memory bound)
--       12 optional: a channel, for a sale lock (src/services/sale_locks.rs)
--       13.. with 12: the card ids the lines take, which must all be live on
--       that channel in the listing mirror (src/services/listing_mirror.rs)
-- Returns the hold view (lib.lua hold_view) when held, or a repeat of the
--       first answer; otherwise one of NEED_GRANT, NOT_ACTIVE, SHORT,
--       CUSTOMER_LIMIT, ID_REUSED (lib.lua), or { 'TOO_MANY_HOLDS', n }.
--       With a channel, before anything else: { 'UNLISTED' } when a card is
--       not mirrored live there (nothing changed: the caller asks Postgres),
--       and { 'AGAIN', hold view } when the id already names a hold of this
--       job, whatever its request (the caller judges a repeat or a refresh).

local hold_id, job, ttl, lines_arg = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local ck, limit, ref, max_active = ARGV[8], tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11])
local channel = ARGV[12] or ''
-- Whether the id is known to name no hold yet (step 1b reads it).
local unused = false
local hk = P .. 'hold:' .. hold_id

-- 1. Time, and expired holds out of the way.
local now = now_ms()
expire_due(now)

-- 1b. A sale lock's own checks, so that an acquire is one call: the mirror
-- must say every card is live on the channel, and an earlier lock under
-- this id is answered as it stands now.
if channel ~= '' then
  for i = 13, #ARGV do
    local version = redis.call('HGET', P .. 'listed:' .. ARGV[i], channel)
    if not version or tonumber(version) <= 0 then
      return { 'UNLISTED' }
    end
  end
  local h, taken = current_hold(hold_id, job, now)
  if h then
    return { 'AGAIN', view_of(h) }
  end
  unused = not taken
end

-- 2. A repeated id answers as the first time; then every rule, before any write.
local lines = cjson.decode(lines_arg)
local rq = take_requests(lines_arg, lines, ck, job, false)
local stop = busy_if_due(admit(hold_id, job, rq, lines, now, ck, limit, unused), now, ck)
if stop == RECHECK then
  stop = admit(hold_id, job, rq, lines, now, ck, limit, unused)
end
if stop then
  return stop
end
if active_count() >= max_active then
  stop = busy_if_due({ 'TOO_MANY_HOLDS', tostring(active_count()) }, now)
  if stop ~= RECHECK then
    return stop
  end
  if active_count() >= max_active then
    return { 'TOO_MANY_HOLDS', tostring(active_count()) }
  end
end

-- 3. Take the units, and the hold gets the tenant's next fencing token. A
-- card's pool (capacity 1, taken only by sale locks) remembers its latest
-- holder, which names who holds or sold it (holders.lua); no other job's
-- pool is ever asked, so no other take pays for the write.
for _, l in ipairs(lines) do
  pool_add(l[1], 'held', l[2])
  if job == 'lock' then
    pool_set(l[1], 'by', hold_id)
  end
end
local fence = next_fence()
if ck ~= '' then
  count_customer(ck, total(lines), lines[1][1])
end
local ln = cjson.encode(lines)
local exp = q_exp(now + ttl)
local fields = { 'HSET', hk, 'st', 'Q', 'job', job, 'rq', request_digest(rq[1]), 'ln', ln, 'exp', exp,
  'cat', ms(now), 'fence', fence }
put_unless_empty(fields, 'ref', ref)
if ck ~= '' then
  put_unless_empty(fields, 'ck', ck)
  put_unless_empty(fields, 'cq', total(lines))
end
redis.call(unpack(fields))
active_add(1)
index_expiry(hold_id, exp, 'xdue')
count_in_bucket(exp, lines, ck, 1)

-- 4. Log it, and answer.
emit(now, 'reserved', job, hold_id, ln, { 'r', ref, 'c', ck })
after_take(lines, now)
return new_hold_view('A', job, ln, exp, ref, now, 0, fence)
