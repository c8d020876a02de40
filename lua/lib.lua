-- lib.lua: helpers shared by every holdfast script.
--
-- The Rust side prepends this file to each script when it builds it
-- (src/store/redis/scripts.rs), so every operation is still one call,
-- atomic on the server: an EVALSHA, or for the hold operations an FCALL of
-- the batch function, whose library defines all of this once when it is
-- loaded rather than on every call. Either way a call starts with
-- begin(ARGV) and ends with settle() (both at the end of this file), which
-- makes the writes it owes. Conventions for every script:
--
--   ARGV[1]  the tenant's key prefix, e.g. "hf:{acme}:" (the braces are the
--            Redis Cluster hash tag: one tenant, one slot)
--   ARGV[2]  how long a finished hold is remembered for idempotent retries (ms)
--   ARGV[3]  now, ms since the Unix epoch: Redis's clock as the daemon follows
--            it on its monotonic clock (src/store/redis/clock.rs), so a step
--            of Redis's wall clock cannot end holds early
--
-- Keys under the prefix (src/store/redis/keys.rs builds the prefix):
--   pool:<pool_id>  hash  grant ret sold held epoch full unl from until low armed lim lw pgf
--                         by (a card's pool only: the sale lock that last took it, its
--                         one holder while held = 1)
--   refill          set   pools whose headroom fell to their low-water mark (lw)
--   hold:<hold_id>  hash  st job rq ln exp ext xid ck cq ref oid cat fin fence
--                         (st: Q active, its units given back by bucket;
--                         A active, from an older build, given back alone;
--                         C committed, R released, E expired)
--                         (rq is a digest of the request, see request_digest;
--                         ext, xid, ck, cq, ref and oid are absent while empty
--                         or zero: a hold is mostly these few bytes, and
--                         memory per hold bounds how many a tenant can have;
--                         a claim has no exp or fin, both its cat: see view_of)
--   fence           string, the tenant's last fencing token (see next_fence)
--   xdue            zset  bucket -> its first ms: the expiry index of Q holds,
--                         in buckets of DUE_BUCKET_MS (see index_expiry)
--   xdue:<bucket>   list  ids of Q holds whose expiry fell in the bucket when
--                         they were made or extended
--   xsums           zset  the buckets whose units are not given back yet,
--                         bucket -> its first ms, and the mark '^' scored by
--                         the first ms of the last one given back (see
--                         give_back_due)
--   xsum:<bucket>   hash  what the bucket's active holds hold: "<pool>\0<epoch>"
--                         -> units, "\0<customer key>" -> units, "\0#" -> holds
--   due, due:<b>    the same index as xdue of an older build's A holds
--   active          string, how many holds are ACTIVE
--   events          stream, one entry per state change
--   cust:<scope>    string, units a customer has in a sale (per-customer limit)
--   listed:<card>   hash  channel -> the listing mirror's version: positive
--                         while the card is live there, negative once not
--                         (src/services/listing_mirror.rs)
--
-- Time is ARGV[3], never TIME read here (see above). Every script checks
-- everything before it writes anything: a Lua error after a write keeps the
-- write.

-- The call's common arguments, set by begin(ARGV).
local P
-- The retention as given (a decimal string): it is only ever passed on to
-- PEXPIRE, and a Lua number passed to redis.call is formatted by printf.
local RETENTION_MS
-- Now, as a number and as given (ARGV[3]).
local NOW_MS, NOW_TEXT

-- Milliseconds since the epoch on Redis's timeline (ARGV[3]).
local function now_ms()
  return NOW_MS
end

-- A time in ms as the decimal string Redis stores. Now is ARGV[3] as
-- given: a claim writes it four times and answers with it three, and
-- formatting a Lua number (in redis.call or here) goes through glibc's
-- printf (deploy/BENCHMARKS.md, 2026-12-03, afternoon).
local function ms(n)
  if n == NOW_MS then
    return NOW_TEXT
  end
  return string.format('%d', n)
end

-- Writes a call owes, made once at its end by settle(). The counters a
-- call changes again and again (a pool's `sold` and `held`, the tenant's
-- `active` and `fence`) and the expiry index's lists are kept in the
-- call's copies as it goes and written once each when it ends (an
-- `active` the call has not read is written at once: active_add): a
-- batch of 64 claims on a hot pool made 64
-- HINCRBYs of one field, each a redis.call that costs more to marshal
-- than to run (deploy/BENCHMARKS.md, "Redis with symbols"). A call is atomic, so nothing
-- reads the keys in between, and within the call every read goes through
-- the copies (read_pool, active_count, next_fence). Once a script has
-- written anything Redis refuses none of its later writes for memory, so
-- the owed writes cannot fail where the call's own did not; an operation
-- that raised an error still has its owed writes made, as its direct ones
-- are kept.
--
-- owed_pool: pool id -> { field -> value } of what the call owes it
-- (owe_pool), and owed_pools the ids that owe, in order; owed_active and
-- owed_fence: whether active_n and fence_last must be written; owed_due:
-- "<index>:<bucket>" -> hold ids to append, and owed_buckets those keys
-- in order; owed_sum: bucket -> { field -> delta } of the
-- buckets' sums (count_in_bucket), owed_sum_buckets the buckets in order,
-- and owed_sum_new those a hold was added to.
local owed_pool, owed_pools, owed_active, owed_fence, owed_due, owed_buckets
local owed_sum, owed_sum_buckets, owed_sum_new

-- The table `owed` keeps under `key`, made empty the first time, when
-- `key` joins `order`: settle makes the owed writes in the order they
-- were first owed.
local function owed_entry(owed, order, key)
  local entry = owed[key]
  if not entry then
    entry = {}
    owed[key] = entry
    order[#order + 1] = key
  end
  return entry
end

-- The tenant's next fencing token: one more than the last, and never less
-- than the clock in microseconds, so tokens keep growing even after Redis
-- lost its data (and the counter with it). Exact in Lua's doubles (below
-- 2^53 until the year 2255); written with %.0f, never as 1e+15.
--
-- The last token is kept for the rest of the call (`fence_last`), so a
-- batch of reserves reads the key once and writes it once (settle).
local fence_last
local function next_fence()
  local floor = NOW_MS * 1000
  if not fence_last then
    fence_last = tonumber(redis.call('GET', P .. 'fence') or '0')
  end
  fence_last = math.max(fence_last + 1, floor)
  owed_fence = true
  return string.format('%.0f', fence_last)
end

-- The tenant's count of ACTIVE holds, read once a call and kept current by
-- active_add, the only way a script changes it.
local active_n
local function active_count()
  if not active_n then
    active_n = tonumber(redis.call('GET', P .. 'active') or '0')
  end
  return active_n
end

-- Adds `delta` to the count of ACTIVE holds; returns the new count. A
-- call that has not read the count yet reads and writes it in one INCRBY;
-- after that, settle writes it once.
local function active_add(delta)
  if not active_n then
    active_n = redis.call('INCRBY', P .. 'active', delta)
  else
    active_n = active_n + delta
    owed_active = true
  end
  return active_n
end

-- A pool's fields as the rules read them, in this order (read_pool).
local POOL_FIELDS = { 'grant', 'ret', 'sold', 'held', 'epoch', 'full', 'unl', 'from', 'until', 'lim', 'low', 'armed',
  'pgf', 'lw' }
-- Each of POOL_FIELDS by its place, for the writes that keep a copy
-- current. (A numeric loop: a function library's top level runs where
-- `ipairs` is not defined.)
local POOL_AT = {}
for i = 1, #POOL_FIELDS do
  POOL_AT[POOL_FIELDS[i]] = i
end
-- The places of POOL_FIELDS that hold numbers; the others (epoch, full,
-- unl, armed) are compared as the strings they are stored as.
local POOL_NUMBERS = { 1, 2, 3, 4, 8, 9, 10, 11, 13, 14 }

-- What this call has read of each pool: pool id -> its POOL_FIELDS as HMGET
-- returned them, the numbers among them (POOL_NUMBERS) as Lua numbers, or
-- nil where absent: the rules of every claim of a batch read a dozen of
-- them, and turning a string into a number is a strtod each time.
--
-- A batch of claims on one hot pool reads it once, not once a claim: the
-- 14-field read was the largest of a claim's calls, and each redis.call
-- costs more to marshal than to run (deploy/BENCHMARKS.md, "Redis with
-- symbols"). The copy stays true because every change to a pool's hash
-- goes through pool_add or pool_set, which keep it current and owe the
-- change (owe_pool), or is a direct write followed by forget_pool
-- (grant.lua, which writes a pool whole, before anything of the call is
-- owed to it); the call is atomic, so nothing else writes it meanwhile.
local pools = {}
local function read_pool(pool_id)
  local p = pools[pool_id]
  if not p then
    p = redis.call('HMGET', P .. 'pool:' .. pool_id, unpack(POOL_FIELDS))
    for i = 1, #POOL_NUMBERS do
      local at = POOL_NUMBERS[i]
      p[at] = tonumber(p[at])
    end
    pools[pool_id] = p
  end
  return p
end

-- Owes `field = value` to a pool: settle writes each pool's changed
-- fields in one HSET. The first change of a pool was written at once, on
-- the reasoning that owing it cost the same; but an operation that changes
-- its pool twice (a sale lock's acquire: `held` and `by`; a commit: `held`
-- and `sold`) then made two calls where one does, and an operation on a
-- pool no other operation of the batch shares (a card, a product of
-- claim-10k) pays every call alone (deploy/BENCHMARKS.md, "one write per
-- pool per call").
local function owe_pool(pool_id, field, value)
  owed_entry(owed_pool, owed_pools, pool_id)[field] = value
end

-- Adds `delta` to a pool's counter (`sold`, `held`, `ret`), keeping the
-- call's copy current; returns the new value. Only pools the call has
-- checked exist are counted in.
local function pool_add(pool_id, field, delta)
  local p = read_pool(pool_id)
  local at = POOL_AT[field]
  local v = (p[at] or 0) + delta
  p[at] = v
  owe_pool(pool_id, field, v)
  return v
end

-- Sets one pool field, keeping the call's copy current (a field outside
-- POOL_FIELDS, such as a card's `by`, is not in the copy).
local function pool_set(pool_id, field, value)
  local p = pools[pool_id]
  if p and POOL_AT[field] then
    p[POOL_AT[field]] = value
  end
  owe_pool(pool_id, field, value)
end

-- Drops the call's copy of a pool, after a script wrote its hash directly.
local function forget_pool(pool_id)
  pools[pool_id] = nil
end

-- Appends one event to the tenant's stream. `fields` is a flat list of extra
-- field/value pairs (reference, order id, customer); empty ones are left
-- out (the reader takes a missing field as empty), since the stream keeps
-- every event for `--event-keep-secs` (a minute by default) after it is
-- drained.
local function emit(now, kind, job, hold_id, lines_json, fields)
  local args = { 'XADD', P .. 'events', '*', 'k', kind, 'j', job, 'h', hold_id,
    'l', lines_json, 't', ms(now) }
  fields = fields or {}
  for i = 1, #fields, 2 do
    if fields[i + 1] ~= '' then
      args[#args + 1] = fields[i]
      args[#args + 1] = fields[i + 1]
    end
  end
  return redis.call(unpack(args))
end

-- Appends `name, value` to the flat list `args` unless value is '' or 0,
-- for hold fields that are absent while empty (see the key list above).
local function put_unless_empty(args, name, value)
  if value ~= '' and value ~= 0 and value ~= '0' then
    args[#args + 1] = name
    args[#args + 1] = value
  end
end

-- What a hold remembers of the request that made it, so that a retry with
-- the same id and the same request answers as the first time and a
-- different request under the same id is refused: 64 bits of its SHA-1,
-- not the request itself (lines can be long; a hold should be small).
local function request_digest(rq)
  return string.sub(redis.sha1hex(rq), 1, 16)
end

-- The request a take remembers (request_digest): its lines, then `tail`
-- (the customer key and the job), as { request, as sent }. A batch names
-- each pool once, so the same lines in another order are the same request,
-- and a retry that sends them so (a client that builds them from an
-- unordered map) gets the first answer: lines are digested in pool order.
-- The second element is the request as sent, when it may differ: a hold
-- made before this rule (2026-12-06) keeps the digest of its lines in the
-- order they came, and a retry of it must still match.
local function requests_of(lines_arg, lines, tail)
  if #lines < 2 then
    return { lines_arg .. tail }
  end
  local sorted = {}
  for i, l in ipairs(lines) do
    sorted[i] = { l[1], l[2] }
  end
  table.sort(sorted, function(a, b) return a[1] < b[1] end)
  return { cjson.encode(sorted) .. tail, lines_arg .. tail }
end

-- The request of a take (requests_of) of `lines` as sent (`lines_arg`) by
-- customer key `ck` for `job`: a claim's names itself so, so that a claim
-- and a hold of the same lines are different requests. claim.lua,
-- reserve.lua and restore.lua (which writes back a lost take's digest)
-- must make the same string.
local function take_requests(lines_arg, lines, ck, job, claim)
  if claim then
    return requests_of(lines_arg, lines, '|' .. ck .. '|claim:' .. job)
  end
  return requests_of(lines_arg, lines, '|' .. ck .. '|' .. job)
end

-- A hold's fields as one HMGET returns them: first the view's (below), in
-- its order, then the customer key and the last extension id. An operation
-- on a hold reads it once (read_hold, current_hold) and builds its answer
-- from what it read and wrote: each redis.call costs, and a commit used to
-- read its hold five times.
local HOLD_FIELDS = { 'st', 'job', 'ln', 'exp', 'ext', 'ref', 'oid', 'cat', 'fin', 'fence', 'ck', 'xid' }
local function read_hold(hold_key)
  return redis.call('HMGET', hold_key, unpack(HOLD_FIELDS))
end

-- Whether a hold's state is ACTIVE: Q, made by this build, whose units go
-- back with its expiry bucket's (give_back_due), or A, made by a build
-- before buckets had sums, whose units go back with the hold alone. An
-- older build's scripts take only A for active, so they refuse to commit,
-- release, extend or expire a Q hold rather than count its units a second
-- time, and its sweeper never sees the xdue index.
local function live(st)
  return st == 'Q' or st == 'A'
end

-- The state as callers know it: both active states are ACTIVE.
local function shown(st)
  if st == 'Q' then
    return 'A'
  end
  return st
end

-- The reply shape of a hold, decoded strictly by src/store/redis/reply.rs:
-- { 'HOLD', st, job, lines_json, expires_at, extensions, ref, order_id,
--   created_at, finished_at, fence }, from a read_hold.
--
-- Only a claim has no `exp`: it ends as it is made, so it stores neither
-- its expiry nor its end, and both are its `cat`. A claim is remembered
-- for the whole retention (a day by default) and flash sales make them by
-- the million: the two fields were 32 of its 200 bytes (deploy/
-- BENCHMARKS.md, 2026-12-03, late). Claims made before kept both, and read the
-- same.
local function view_of(h)
  local exp, fin = h[4], h[9]
  if not exp then
    exp, fin = h[8], h[8]
  end
  return { 'HOLD', shown(h[1]), h[2], h[3], exp or '0', h[5] or '0', h[6] or '', h[7] or '', h[8] or '0', fin or '0',
    h[10] or '0' }
end

local function hold_view(hold_key)
  return view_of(read_hold(hold_key))
end

-- The view of a hold just written by reserve, from what it wrote (a new
-- hold has no extensions and no order id), so the answer needs no read
-- back. Numbers as HMGET would return them: decimal strings. (A new claim
-- answers shorter still: claim.lua.)
local function new_hold_view(st, job, ln, exp, ref, cat, fin, fence)
  return { 'HOLD', st, job, ln, ms(exp), '0', ref, '', ms(cat), ms(fin), fence }
end

-- A pool's headroom: grant - ret - sold - held (reserved units count as
-- gone), from its fields as read_pool keeps them.
local function headroom_of(p)
  return p[1] - p[2] - p[3] - p[4]
end

-- Emits a `low_stock` event once per crossing of a pool's low-stock
-- threshold (field `low`), and re-arms when availability rises above it.
-- Available = Redis's headroom + what Postgres had left to grant at the
-- last grant (`pgf`). Reads the pool through read_pool, so after a take or
-- a release (which keep the copy current) it costs no read.
local function check_low(pool_id, now)
  local p = read_pool(pool_id)
  local low, armed = p[11], p[12]
  if not p[1] or not low or low < 0 then
    return
  end
  local avail = headroom_of(p) + (p[13] or 0)
  if avail <= low then
    if armed ~= '0' then
      pool_set(pool_id, 'armed', '0')
      emit(now, 'low_stock', 'stock', '', cjson.encode({ { pool_id, avail, tonumber(p[5]) } }),
        { 'r', 'threshold=' .. low })
    end
  elseif armed == '0' then
    pool_set(pool_id, 'armed', '1')
  end
end

-- The expiry index keeps hold ids in lists, one per DUE_BUCKET_MS of
-- expiry time, and the buckets in a sorted set: a list entry costs about 10
-- bytes where a sorted-set entry per hold cost 111, and memory per hold
-- bounds how many a tenant can have. An entry is never removed early: a
-- hold that ends (or is extended into a later bucket) leaves a stale entry
-- that is skipped when its bucket comes due. A hold's own `exp` is what
-- says whether it is due; the index only says where to look.
--
-- A bucket is "full" once its last millisecond has passed: every hold in
-- it is due. Only the first bucket can be partly due (the one that holds
-- now); takes look into the partial one only when a refusal depends on it
-- (busy_if_due), so the hot path never scans it.
--
-- Ending an expired hold is two things: its units (and its customer's,
-- and its place among the tenant's active holds) go back, so that it
-- blocks nothing; and its state becomes EXPIRED, with its event and its
-- retention. The first is done for a whole bucket at once: each bucket of
-- Q holds keeps the sum of what its active holds hold (xsum:<bucket>,
-- count_in_bucket), and every call gives back the sums of the buckets
-- that have filled (give_back_due), a few calls a bucket whatever its
-- holds. 100,000 holds that expire in the same second cost Redis ~6 µs
-- each when each gave its units back alone, and the burst starved the
-- claims made meanwhile (deploy/BENCHMARKS.md, "mass expiry"). The second
-- is per hold, and the sweeper paces it (book_expired). A Q hold whose
-- bucket was given back is expired from then on, whatever reads it; until
-- its state is written, every call that touches it writes it.
local DUE_BUCKET_MS = 50

-- The bucket of an expiry (ms), as the decimal string that names it.
local function bucket_of(exp)
  return string.format('%d', math.floor(exp / DUE_BUCKET_MS))
end

-- Files `hold_id` under the bucket of `exp` (ms) in `index` ('xdue' for
-- Q holds, 'due' for A holds), by the call's end (settle: one RPUSH and
-- one ZADD a bucket, not a hold). Nothing of the call looks for it there
-- before: `exp` is later than now (a TTL is at least a second), and the
-- call only looks into buckets that hold now.
local function index_expiry(hold_id, exp, index)
  local ids = owed_entry(owed_due, owed_buckets, index .. ':' .. bucket_of(exp))
  ids[#ids + 1] = hold_id
end

-- The field of a bucket's sum that counts its holds, and the prefix of a
-- customer's (pool ids and customer keys never start with a NUL).
local COUNT_FIELD = '\0#'

-- Adds (`sign` 1) or takes out (-1) a Q hold's lines, customer units and
-- itself to or from the sum of its expiry bucket, by the call's end
-- (settle: one HINCRBY a field a bucket, however many holds).
local function count_in_bucket(exp, lines, ck, sign)
  local b = bucket_of(exp)
  local s = owed_entry(owed_sum, owed_sum_buckets, b)
  local units = 0
  for _, l in ipairs(lines) do
    local f = l[1] .. '\0' .. tostring(l[3])
    s[f] = (s[f] or 0) + sign * l[2]
    units = units + l[2]
  end
  if ck and ck ~= '' then
    local f = '\0' .. ck
    s[f] = (s[f] or 0) + sign * units
  end
  s[COUNT_FIELD] = (s[COUNT_FIELD] or 0) + sign
  if sign > 0 then
    owed_sum_new[b] = true
  end
end

-- The earlier of two times, either of which may be nil.
local function earlier(a, b)
  if not a or (b and b < a) then
    return b
  end
  return a
end

-- Where giving back stands, as read by this call: back_wm, the last bucket
-- given back (-1 before the first); back_next, the first bucket not given
-- back yet as { bucket, first_ms }, or nil; all_back, false when this call
-- left full buckets for later (its budget); back_oldest, the first ms of
-- the oldest bucket this call gave back (the sweeper's lag); back_done,
-- whether this call has looked.
--
-- `xsums` holds both in its first two entries: the mark '^', scored by the
-- first ms of the last bucket given back, sorts before every bucket not
-- given back (a bucket is given back only once full, and no hold is filed
-- into a bucket at or below the mark: q_exp), so one ZRANGE reads both.
local BACK_MARK = '^'
local back_wm, back_next, all_back, back_oldest, back_done

local function read_back()
  local r = redis.call('ZRANGE', P .. 'xsums', 0, 1, 'WITHSCORES')
  back_wm, back_next = -1, nil
  local i = 1
  if r[1] == BACK_MARK then
    back_wm = math.floor(tonumber(r[2]) / DUE_BUCKET_MS)
    i = 3
  end
  if r[i] then
    back_next = { r[i], tonumber(r[i + 1]) }
  end
end

-- Gives back the sums of the buckets that are full at `now`, oldest first,
-- once a call (whichever of its steps asks first); `budget` bounds the
-- fields read, a whole bucket at a time, and what is left over leaves
-- all_back false (a take that comes up short then answers BUSY, and the
-- sweep gives back the rest). A pool reloaded under a newer epoch no
-- longer counts the units; a customer's counter that would go below zero
-- had expired and is dropped (as finish_all does).
local GIVE_BACK_BUDGET = 1000
local function give_back_due(now, budget)
  if back_done then
    return
  end
  back_done = true
  read_back()
  local spent = 0
  while back_next and back_next[2] + DUE_BUCKET_MS <= now + 1 do
    if spent >= budget then
      all_back = false
      return
    end
    local b, from = back_next[1], back_next[2]
    local sk = P .. 'xsum:' .. b
    local sums = redis.call('HGETALL', sk)
    for i = 1, #sums, 2 do
      local f, v = sums[i], tonumber(sums[i + 1])
      if v ~= 0 then
        if f == COUNT_FIELD then
          active_add(-v)
        elseif string.byte(f, 1) == 0 then
          local ck = P .. string.sub(f, 2)
          if redis.call('DECRBY', ck, v) < 0 then
            redis.call('DEL', ck)
          end
        else
          local cut = string.find(f, '\0', 1, true)
          local pool_id = string.sub(f, 1, cut - 1)
          if read_pool(pool_id)[5] == string.sub(f, cut + 1) then
            pool_add(pool_id, 'held', -v)
            check_low(pool_id, now)
          end
        end
      end
    end
    spent = spent + 1 + #sums / 2
    redis.call('DEL', sk)
    redis.call('ZREM', P .. 'xsums', b)
    redis.call('ZADD', P .. 'xsums', from, BACK_MARK)
    back_oldest = back_oldest or from
    read_back()
  end
end

-- Whether the units of a Q hold expiring at `exp` are back already (its
-- bucket was given back): it is expired then, even if the clock of the
-- call that reads it says its time is not quite up.
local function units_back(exp)
  give_back_due(NOW_MS, GIVE_BACK_BUDGET)
  return math.floor(exp / DUE_BUCKET_MS) <= back_wm
end

-- The expiry to give a Q hold asking for `exp`: never in a bucket already
-- given back, whose sum nobody would give back again (only a TTL shorter
-- than the bucket, or a clock far behind another daemon's, asks for one):
-- the first ms of the next bucket then.
local function q_exp(exp)
  if units_back(exp) then
    return (back_wm + 1) * DUE_BUCKET_MS
  end
  return exp
end

-- The first bucket of A holds (`due`) as { bucket, first_ms, full }, or
-- nil when none starts by `now`.
local function first_due_bucket(now)
  local first = redis.call('ZRANGE', P .. 'due', 0, 0, 'WITHSCORES')
  if not first[1] or tonumber(first[2]) > now then
    return nil
  end
  local from = tonumber(first[2])
  return { first[1], from, from + DUE_BUCKET_MS <= now + 1 }
end

-- Ends those of `hold_ids` that are ACTIVE and, with `due_by`, due by then
-- (or, for a Q hold, given back), as released ('R') or expired ('E'):
-- gives their units back to every pool of the epoch they took them from,
-- gives the customers' units back, and logs one event per hold. A Q hold
-- whose bucket was given back has nothing left to give: only its state,
-- event and retention are written. Pools are updated once per call, not
-- once per hold, because the sweeper ends holds hundreds at a time.
-- Returns how many it ended and the earliest expiry among them (for the
-- sweeper's lag).
local function finish_all(hold_ids, state, now, kind, due_by)
  local owed, order = {}, {}
  local ended, returned, earliest = 0, 0, nil
  for _, hold_id in ipairs(hold_ids) do
    local hk = P .. 'hold:' .. hold_id
    local h = redis.call('HMGET', hk, 'st', 'exp', 'ln', 'ck', 'cq', 'job', 'ref')
    local exp = tonumber(h[2] or '0')
    local gone = h[1] == 'Q' and units_back(exp)
    if live(h[1]) and (not due_by or exp <= due_by or gone) then
      ended = ended + 1
      earliest = earlier(earliest, exp)
      if not gone then
        returned = returned + 1
        local lines = cjson.decode(h[3])
        for _, l in ipairs(lines) do
          local at = l[1] .. '\0' .. tostring(l[3])
          if not owed[at] then
            owed[at] = { l[1], tostring(l[3]), 0 }
            order[#order + 1] = at
          end
          owed[at][3] = owed[at][3] + l[2]
        end
        -- A customer's counter is never below zero; below it, the counter
        -- had expired (count_customer) and this made it anew: drop it.
        if h[4] and h[4] ~= '' and redis.call('DECRBY', P .. h[4], h[5]) < 0 then
          redis.call('DEL', P .. h[4])
        end
        if h[1] == 'Q' then
          count_in_bucket(exp, lines, h[4], -1)
        end
      end
      redis.call('HSET', hk, 'st', state, 'fin', ms(now))
      redis.call('PEXPIRE', hk, RETENTION_MS)
      emit(now, kind, h[6], hold_id, h[3], { 'r', h[7] or '' })
    end
  end
  for _, at in ipairs(order) do
    local pool_id, epoch, qty = owed[at][1], owed[at][2], owed[at][3]
    -- A pool reloaded under a newer epoch no longer counts these holds.
    if read_pool(pool_id)[5] == epoch then
      pool_add(pool_id, 'held', -qty)
      check_low(pool_id, now)
    end
  end
  if returned > 0 then
    active_add(-returned)
  end
  return ended, earliest
end

-- Ends one ACTIVE hold (see finish_all).
local function finish(hold_id, state, now, kind)
  finish_all({ hold_id }, state, now, kind)
end

-- Pops up to `n` ids of bucket `b` of the expiry index `index` (dropping
-- the bucket with its list's last ids) and ends those that are due;
-- returns how many ids it popped, how many holds it ended and the
-- earliest expiry among them.
local function pop_due(index, b, n, now)
  local ids = redis.call('LPOP', P .. index .. ':' .. b, n)
  if not ids or #ids < n then
    -- The list is gone (Redis deletes an empty list): so is its bucket.
    redis.call('ZREM', P .. index, b)
  end
  if not ids then
    return 0, 0, nil
  end
  local ended, earliest = finish_all(ids, 'E', now, 'expired', now)
  return #ids, ended, earliest
end

-- Gives back the buckets that are full, then finalises up to `limit` of
-- the tenant's due A holds, oldest bucket first, from full buckets only;
-- returns how many, and the earliest expiry among them. Without a limit it
-- spends from one budget of DUE_LIMIT index entries per script call,
-- shared by every operation of a batch (batch.lua), so that a burst of
-- expiries never makes one call block Redis: the sweeper finishes them in
-- bounded batches, and a take that comes up short while some are still due
-- answers BUSY (see busy_if_due) instead of refusing.
--
-- Once a look found no full bucket left, none is left for the rest of the
-- call: every operation of a batch shares one `now`. The later operations
-- of a batch skip the look.
local DUE_LIMIT = 100
local due_budget = DUE_LIMIT
local none_due = false
local function expire_due(now, limit)
  give_back_due(now, limit or GIVE_BACK_BUDGET)
  local n = limit or due_budget
  local ended, earliest = 0, nil
  while n > 0 and not none_due do
    local b = first_due_bucket(now)
    if not b or not b[3] then
      none_due = true
      break
    end
    local popped, e, at = pop_due('due', b[1], n, now)
    n = n - popped
    if not limit then
      due_budget = due_budget - popped
    end
    ended = ended + e
    earliest = earlier(earliest, at)
  end
  return ended, earliest
end

-- Writes the EXPIRED state, event and retention of up to `limit` Q holds
-- whose buckets were given back, oldest bucket first: the per-hold half of
-- an expiry, which the sweeper paces (src/engine/mod.rs, finish_due) so
-- that a burst of expiries leaves Redis to the calls made meanwhile.
-- Returns how many it ended, the earliest expiry among them, and whether
-- some are left.
local function book_expired(now, limit)
  give_back_due(now, limit)
  local n, ended, earliest = limit, 0, nil
  while true do
    local first = redis.call('ZRANGE', P .. 'xdue', 0, 0)
    if not first[1] or tonumber(first[1]) > back_wm then
      return ended, earliest, false
    end
    if n <= 0 then
      return ended, earliest, true
    end
    local popped, e, at = pop_due('xdue', first[1], n, now)
    n = n - popped
    ended = ended + e
    earliest = earlier(earliest, at)
  end
end

-- Appends to `due` the ids in list `lk` of holds that are ACTIVE and due
-- at `now`, until it has `limit`. The list is read a page at a time, so
-- finding the first due hold of a burst's bucket (ids in the order they
-- were made, mostly the order they expire) does not copy the whole list.
local PAGE = 500
local function due_in_list(lk, now, limit, due)
  local from = 0
  while #due < limit do
    local ids = redis.call('LRANGE', lk, from, from + PAGE - 1)
    for _, id in ipairs(ids) do
      local h = redis.call('HMGET', P .. 'hold:' .. id, 'st', 'exp')
      if live(h[1]) and tonumber(h[2]) <= now then
        due[#due + 1] = id
        if #due >= limit then
          return
        end
      end
    end
    if #ids < PAGE then
      return
    end
    from = from + PAGE
  end
end

-- Whether the Q holds of bucket `b` may hold something refusal `stop`
-- lacks: the bucket's sum (count_in_bucket) counts its active holds'
-- units by pool and epoch, by customer, and the holds themselves, so
-- when it counts none of the short pools' units (under their current
-- epoch: units of an older one go back to nothing), none of customer
-- `ck`'s for CUSTOMER_LIMIT, or no hold for TOO_MANY_HOLDS, ending its
-- due holds cannot turn the refusal around. One HMGET instead of one a
-- hold: a shop sold out of one product while carts came and went on
-- others read every hold of the partial bucket on each refused call
-- (~25 HMGETs a refused claim, deploy/BENCHMARKS.md, "a sale that
-- lasts").
local function may_hold(b, stop, ck)
  local fields = {}
  if stop[1] == 'SHORT' then
    for i = 2, #stop, 3 do
      fields[#fields + 1] = stop[i] .. '\0' .. tostring(tonumber(read_pool(stop[i])[5]))
    end
  elseif stop[1] == 'TOO_MANY_HOLDS' then
    fields[1] = COUNT_FIELD
  elseif stop[1] == 'CUSTOMER_LIMIT' and ck and ck ~= '' then
    fields[1] = '\0' .. ck
  else
    return true
  end
  for _, v in ipairs(redis.call('HMGET', P .. 'xsum:' .. b, unpack(fields))) do
    if tonumber(v or '0') > 0 then
      return true
    end
  end
  return false
end

-- The ids of the holds that are due at `now` in the partial buckets (the
-- one of A holds, and the first of Q holds not given back), up to `limit`.
-- The scan is bounded by the holds made in one DUE_BUCKET_MS. With
-- `stop`, the refusal the holds are looked for (customer `ck`'s), the Q
-- bucket is read only if it may hold what the refusal lacks (may_hold);
-- the second value is false when it was not, since another refusal may
-- need it read.
local function due_in_partial(now, limit, stop, ck)
  local due, whole = {}, true
  local b = first_due_bucket(now)
  if b and not b[3] then
    due_in_list(P .. 'due:' .. b[1], now, limit, due)
  end
  give_back_due(now, GIVE_BACK_BUDGET)
  local x = back_next
  if x and x[2] <= now and x[2] + DUE_BUCKET_MS > now + 1 then
    if not stop or may_hold(x[1], stop, ck) then
      due_in_list(P .. 'xdue:' .. x[1], now, limit, due)
    else
      whole = false
    end
  end
  return due, whole
end

-- Finalises one hold if it is due, whatever else is: an operation on a
-- hold must see it expired the instant its time is up.
local function expire_hold(id, now)
  finish_all({ id }, 'E', now, 'expired', now)
end

-- Hold `hold_id` of `job` as read_hold reads it, finalised first if its
-- time is up (see expire_hold); nil when there is no such hold, or it is
-- another job's: a service never sees, or touches, another job's holds.
-- With nil, a second value says whether the id names a hold at all (every
-- hold has its `st`), so a caller about to make one need not ask again.
local function current_hold(hold_id, job, now)
  local hk = P .. 'hold:' .. hold_id
  local h = read_hold(hk)
  if not h[1] or h[2] ~= job then
    return nil, h[1] and true or false
  end
  if live(h[1]) and (tonumber(h[4]) <= now or (h[1] == 'Q' and units_back(tonumber(h[4])))) then
    expire_hold(hold_id, now)
    h = read_hold(hk)
  end
  return h
end

-- A refusal that units of unfinalised expired holds might turn around is
-- not yet an answer. The few holds the partial buckets have due are ended
-- here, and the caller looks at its rules again (busy_if_due answers
-- RECHECK). A burst, a full bucket left over the call's budget or more
-- due in the partial ones than the budget allows, becomes { 'BUSY' }: the
-- engine sweeps (sweep.lua gives back and finalises every due hold, the
-- partial buckets' too) and retries. So expired holds never block a take,
-- even in a burst, and holds that come due all the time (carts expiring
-- every millisecond) never keep a refusal from being answered: with BUSY
-- alone, each retry found new ones due and the take gave up UNAVAILABLE.
-- Once a look found none due, the rest of the call (same `now`) needs no
-- second look. `ck` is the customer counter the take counts against ('' or
-- nil for none), whose units a CUSTOMER_LIMIT refusal lacks.
local RECHECK = { 'RECHECK' }
local partial_clear = false
local function busy_if_due(stop, now, ck)
  if not stop or partial_clear
      or not (stop[1] == 'SHORT' or stop[1] == 'CUSTOMER_LIMIT' or stop[1] == 'TOO_MANY_HOLDS') then
    return stop
  end
  local b = first_due_bucket(now)
  give_back_due(now, GIVE_BACK_BUDGET)
  if (b and b[3]) or not all_back then
    return { 'BUSY' }
  end
  local due, whole = due_in_partial(now, due_budget + 1, stop, ck)
  if #due > due_budget then
    return { 'BUSY' }
  end
  partial_clear = whole
  if #due == 0 then
    return stop
  end
  due_budget = due_budget - #due
  finish_all(due, 'E', now, 'expired', now)
  return RECHECK
end

-- Checks that every line (a list of {pool_id, qty}) can be taken now.
-- On success returns nil and stamps each line with its pool's epoch as l[3].
-- Otherwise returns the reply to send:
--   { 'NEED_GRANT', pool_id... }     a pool has no grant yet, or needs more
--   { 'NOT_ACTIVE', pool_id }        outside the pool's sale window
--   { 'SHORT', pool_id, qty, available, ... }   sold out
-- `check_window` is false for operations that finish an existing hold.
local function check_lines(lines, now, check_window)
  local need, short = {}, {}
  for _, l in ipairs(lines) do
    local p = read_pool(l[1])
    if not p[1] or not p[5] then
      need[#need + 1] = l[1]
    else
      local from, till = p[8] or 0, p[9] or 0
      if check_window and ((from > 0 and now < from) or (till > 0 and now >= till)) then
        return { 'NOT_ACTIVE', l[1] }
      end
      l[3] = tonumber(p[5])
      if p[7] ~= '1' then
        local avail = headroom_of(p)
        local lim = p[10] or -1
        -- A ceiling below the grant (a cut schedule) is final: no grant helps.
        local capped = lim >= 0 and lim - p[3] - p[4] < avail
        if capped then
          avail = lim - p[3] - p[4]
        end
        if avail < l[2] then
          if p[6] == '1' or capped then
            short[#short + 1] = l[1]
            short[#short + 1] = l[2]
            short[#short + 1] = math.max(avail, 0)
          else
            need[#need + 1] = l[1]
          end
        end
      end
    end
  end
  if #need > 0 then
    table.insert(need, 1, 'NEED_GRANT')
    return need
  end
  if #short > 0 then
    table.insert(short, 1, 'SHORT')
    return short
  end
  return nil
end

-- Whether each customer counter check_customer read existed then
-- (counter key suffix -> true or false), for count_customer.
local customer_had = {}

-- Checks a per-customer limit; `ck` is '' when the sale has none.
local function check_customer(ck, limit, qty)
  if ck == '' then
    return nil
  end
  local v = redis.call('GET', P .. ck)
  customer_had[ck] = v and true or false
  local used = tonumber(v or '0')
  if used + qty > limit then
    return { 'CUSTOMER_LIMIT', tostring(used) }
  end
  return nil
end

-- Counts `qty` units against the customer's limit once check_customer
-- allowed them. A new counter expires a retention after the window of
-- `pool_id` ends (its sale's `until`), so a sale's customers do not stay
-- in Redis for good: a shop that runs a sale a week for a million
-- customers kept a million keys more each week. Once the window has
-- ended every take is refused, so nothing checks the counter again; a
-- hold that outlives it gives its units back to nothing (finish_all).
-- Setting the expiry with the first write costs no call: an existing
-- counter is incremented and keeps its expiry (one an earlier build made
-- has none).
local function count_customer(ck, qty, pool_id)
  if customer_had[ck] then
    redis.call('INCRBY', P .. ck, qty)
    return
  end
  customer_had[ck] = true
  local till = read_pool(pool_id)[9] or 0
  if till > 0 then
    redis.call('SET', P .. ck, qty, 'PXAT', ms(till + tonumber(RETENTION_MS)))
  else
    redis.call('SET', P .. ck, qty)
  end
end

-- Flags the pools whose grant is running low (headroom at or below `lw`)
-- for the refiller (src/jobs/refiller.rs), so a take rarely has to wait for
-- a grant. Pools that hold all Postgres could give (`full`) never ask.
-- `headroom` is grant - ret - sold - held, `full` and `lw` the pool's fields.
local function want_refill(pool_id, headroom, full, lw)
  if full ~= '1' and lw and headroom <= lw then
    redis.call('SADD', P .. 'refill', pool_id)
  end
end

-- What follows a take of `lines` (reserve, claim), once pool_add has
-- counted it: the low-stock alert and the refill flag, from the pools as
-- read_pool keeps them (no read).
local function after_take(lines, now)
  for _, l in ipairs(lines) do
    local p = read_pool(l[1])
    check_low(l[1], now)
    want_refill(l[1], headroom_of(p), p[6], p[14])
  end
end

-- Sum of the quantities of a list of lines.
local function total(lines)
  local n = 0
  for _, l in ipairs(lines) do
    n = n + l[2]
  end
  return n
end

-- The common start of reserve and claim: the id check, then every rule.
-- Returns a reply when the call must stop here, else nil. `rq` is the
-- request as requests_of gives it. `unused` is
-- true when the caller has just read the id and found no hold under it
-- (a sale lock's acquire, through current_hold): a finished hold is kept
-- for the retention and ending holds makes none, so the answer stands for
-- the rest of the call and the id is not asked again.
local function admit(hold_id, job, rq, lines, now, ck, limit, unused)
  local hk = P .. 'hold:' .. hold_id
  if not unused and redis.call('EXISTS', hk) == 1 then
    local first = redis.call('HGET', hk, 'rq')
    if first == request_digest(rq[1]) or (rq[2] and first == request_digest(rq[2])) then
      -- The first answer, as the hold is now: one past its expiry is
      -- EXPIRED (as a read of it says), not an ACTIVE hold whose time is
      -- up. The digest names the job, so the hold is this job's.
      return view_of(current_hold(hold_id, job, now))
    end
    return { 'ID_REUSED' }
  end
  return check_lines(lines, now, true) or check_customer(ck, limit, total(lines))
end

-- Makes the writes the call owes (see owe_pool): each pool's changed
-- fields in one HSET, the counters, and the expiry index's new entries a
-- bucket at a time. Every call ends with it: batch.lua's function, and
-- each script as scripts.rs wraps it.
local PUSH_STEP = 1000
local function settle()
  for _, pool_id in ipairs(owed_pools) do
    local args = { 'HSET', P .. 'pool:' .. pool_id }
    for field, value in pairs(owed_pool[pool_id]) do
      args[#args + 1] = field
      args[#args + 1] = value
    end
    redis.call(unpack(args))
  end
  if owed_active then
    redis.call('SET', P .. 'active', string.format('%d', active_n))
  end
  if owed_fence then
    redis.call('SET', P .. 'fence', string.format('%.0f', fence_last))
  end
  for _, at in ipairs(owed_buckets) do
    local index, b = string.match(at, '^(%a+):(%d+)$')
    local ids = owed_due[at]
    -- unpack puts every value on Lua's stack: a few thousand at a time.
    for i = 1, #ids, PUSH_STEP do
      redis.call('RPUSH', P .. index .. ':' .. b, unpack(ids, i, math.min(i + PUSH_STEP - 1, #ids)))
    end
    redis.call('ZADD', P .. index, 'NX', tonumber(b) * DUE_BUCKET_MS, b)
  end
  for _, b in ipairs(owed_sum_buckets) do
    local sk = P .. 'xsum:' .. b
    for field, delta in pairs(owed_sum[b]) do
      if delta ~= 0 then
        redis.call('HINCRBY', sk, field, delta)
      end
    end
    -- Only a hold added files the bucket: one taken out was in it already,
    -- and a bucket given back must never come back (give_back_due).
    if owed_sum_new[b] then
      redis.call('ZADD', P .. 'xsums', 'NX', tonumber(b) * DUE_BUCKET_MS, b)
    end
  end
end

-- Starts a call: its common arguments, and a fresh copy of the state that
-- lasts one call (the due budget, what was found due, the pools, the
-- active count and the fence as read, the customer counters seen, and the
-- writes owed). A script's locals start fresh on every EVALSHA anyway; a
-- function's library is loaded once and its locals live from call to
-- call, so every one of them that a call changes is reset here.
local function begin(argv)
  P, RETENTION_MS, NOW_MS, NOW_TEXT = argv[1], argv[2], tonumber(argv[3]), argv[3]
  due_budget, none_due, partial_clear = DUE_LIMIT, false, false
  pools, active_n, fence_last, customer_had = {}, nil, nil, {}
  owed_pool, owed_pools, owed_active, owed_fence, owed_due, owed_buckets = {}, {}, false, false, {}, {}
  owed_sum, owed_sum_buckets, owed_sum_new = {}, {}, {}
  back_wm, back_next, all_back, back_oldest, back_done = -1, nil, true, nil, false
end
