-- lib.lua: helpers shared by every holdfast script.
--
-- The Rust side prepends this file to each operation's script when it builds
-- it (src/store/redis/scripts.rs), so every operation is still one EVALSHA,
-- atomic on the server. Conventions for every script:
--
--   ARGV[1]  the tenant's key prefix, e.g. "hf:{acme}:" (the braces are the
--            Redis Cluster hash tag: one tenant, one slot)
--   ARGV[2]  how long a finished hold is remembered for idempotent retries (ms)
--   ARGV[3]  now, ms since the Unix epoch: Redis's clock as the daemon follows
--            it on its monotonic clock (src/store/redis/clock.rs), so a step
--            of Redis's wall clock cannot end holds early
--
-- Keys under the prefix (src/store/redis/keys.rs names the same ones):
--   pool:<pool_id>  hash  grant ret sold held epoch full unl from until low armed lim lw pgf
--                         by (the hold that last took units: for a capacity-1
--                         pool, its one holder while held = 1)
--   refill          set   pools whose headroom fell to their low-water mark (lw)
--   hold:<hold_id>  hash  st job rq ln exp ext xid ck cq ref oid cat fin fence
--                         (rq is a digest of the request, see request_digest;
--                         ext, xid, ck, cq, ref and oid are absent while empty
--                         or zero: a hold is mostly these few bytes, and
--                         memory per hold bounds how many a tenant can have)
--   fence           string, the tenant's last fencing token (see next_fence)
--   exp             zset  hold_id -> expires_at (ms) of every ACTIVE hold
--   events          stream, one entry per state change
--   cust:<scope>    string, units a customer has in a sale (per-customer limit)
--
-- Time is ARGV[3], never TIME read here (see above). Every script checks
-- everything before it writes anything: a Lua error after a write keeps the
-- write.

local P = ARGV[1]
local RETENTION_MS = tonumber(ARGV[2])
local NOW_MS = tonumber(ARGV[3])

-- Milliseconds since the epoch on Redis's timeline (ARGV[3]).
local function now_ms()
  return NOW_MS
end

-- The tenant's next fencing token: one more than the last, and never less
-- than the clock in microseconds, so tokens keep growing even after Redis
-- lost its data (and the counter with it). Exact in Lua's doubles (below
-- 2^53 until the year 2255); written with %.0f, never as 1e+15.
local function next_fence()
  local floor = NOW_MS * 1000
  local last = tonumber(redis.call('GET', P .. 'fence') or '0')
  local fence = string.format('%.0f', math.max(last + 1, floor))
  redis.call('SET', P .. 'fence', fence)
  return fence
end

-- Appends one event to the tenant's stream. `fields` is a flat list of extra
-- field/value pairs (reference, order id, customer); empty ones are left
-- out (the reader takes a missing field as empty), since the stream keeps
-- every event for an hour after it is drained.
local function emit(now, kind, job, hold_id, lines_json, fields)
  local args = { 'XADD', P .. 'events', '*', 'k', kind, 'j', job, 'h', hold_id,
    'l', lines_json, 't', tostring(now) }
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

-- The reply shape of a hold, decoded strictly by src/store/redis/reply.rs:
-- { 'HOLD', st, job, lines_json, expires_at, extensions, ref, order_id,
--   created_at, finished_at, fence }
local function hold_view(hold_key)
  local h = redis.call('HMGET', hold_key, 'st', 'job', 'ln', 'exp', 'ext', 'ref', 'oid', 'cat', 'fin', 'fence')
  return { 'HOLD', h[1], h[2], h[3], h[4] or '0', h[5] or '0', h[6] or '', h[7] or '', h[8] or '0', h[9] or '0',
    h[10] or '0' }
end

-- Emits a `low_stock` event once per crossing of a pool's low-stock
-- threshold (field `low`), and re-arms when availability rises above it.
-- Available = Redis's headroom (grant - ret - sold - held: reserved units
-- count as gone) + what Postgres had left to grant at the last grant (`pgf`).
local function check_low(pool_id, now)
  local pk = P .. 'pool:' .. pool_id
  local p = redis.call('HMGET', pk, 'low', 'armed', 'grant', 'ret', 'sold', 'held', 'pgf', 'epoch')
  if not p[1] or tonumber(p[1]) < 0 then
    return
  end
  local low = tonumber(p[1])
  local avail = tonumber(p[3]) - tonumber(p[4]) - tonumber(p[5]) - tonumber(p[6]) + tonumber(p[7] or '0')
  if avail <= low then
    if p[2] ~= '0' then
      redis.call('HSET', pk, 'armed', '0')
      emit(now, 'low_stock', 'stock', '', cjson.encode({ { pool_id, avail, tonumber(p[8]) } }),
        { 'r', 'threshold=' .. p[1] })
    end
  elseif p[2] == '0' then
    redis.call('HSET', pk, 'armed', '1')
  end
end

-- Ends ACTIVE holds as released ('R') or expired ('E'): gives their units
-- back to every pool of the epoch they took them from, gives the customers'
-- units back, and logs one event per hold. Pools are updated once per
-- call, not once per hold, and the expiry index in one ZREM, because the
-- sweeper ends holds hundreds at a time (a burst of expiries is mostly
-- this loop).
local function finish_all(hold_ids, state, now, kind)
  local back, order = {}, {}
  for _, hold_id in ipairs(hold_ids) do
    local hk = P .. 'hold:' .. hold_id
    local h = redis.call('HMGET', hk, 'ln', 'ck', 'cq', 'job', 'ref')
    for _, l in ipairs(cjson.decode(h[1])) do
      local at = l[1] .. '\0' .. tostring(l[3])
      if not back[at] then
        back[at] = { l[1], tostring(l[3]), 0 }
        order[#order + 1] = at
      end
      back[at][3] = back[at][3] + l[2]
    end
    if h[2] and h[2] ~= '' then
      redis.call('DECRBY', P .. h[2], h[3])
    end
    redis.call('HSET', hk, 'st', state, 'fin', now)
    redis.call('PEXPIRE', hk, RETENTION_MS)
    emit(now, kind, h[4], hold_id, h[1], { 'r', h[5] or '' })
  end
  for _, at in ipairs(order) do
    local pool_id, epoch, qty = back[at][1], back[at][2], back[at][3]
    local pk = P .. 'pool:' .. pool_id
    -- A pool reloaded under a newer epoch no longer counts these holds.
    if redis.call('HGET', pk, 'epoch') == epoch then
      redis.call('HINCRBY', pk, 'held', -qty)
      check_low(pool_id, now)
    end
  end
  -- ZREM takes many members; unpack is bounded by Lua's C stack (~8000).
  for i = 1, #hold_ids, 1000 do
    redis.call('ZREM', P .. 'exp', unpack(hold_ids, i, math.min(i + 999, #hold_ids)))
  end
end

-- Ends one ACTIVE hold (see finish_all).
local function finish(hold_id, state, now, kind)
  finish_all({ hold_id }, state, now, kind)
end

-- Finalises up to `limit` of the tenant's due holds, oldest first; returns
-- how many. Without a limit it spends from one budget of DUE_LIMIT per
-- script call, shared by every operation of a batch (batch.lua), so that a
-- burst of expiries (100k holds ending in the same second) never makes one
-- call block Redis: the sweeper finishes them in bounded batches, and a take
-- that comes up short while some are still due answers BUSY (see
-- busy_if_due) instead of refusing.
--
-- Once a look found fewer due holds than it could take, none is left due
-- for the rest of the call: every operation of a batch shares one `now`,
-- and none makes a hold due at it (a ttl is at least 1 ms). The later
-- operations of a batch skip the look.
local DUE_LIMIT = 100
local due_budget = DUE_LIMIT
local none_due = false
local function expire_due(now, limit)
  local n = limit or due_budget
  if n <= 0 or none_due then
    return 0
  end
  local due = redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, n)
  if #due > 0 then
    finish_all(due, 'E', now, 'expired')
  end
  if not limit then
    due_budget = due_budget - #due
  end
  none_due = #due < n
  return #due
end

-- Finalises one hold if it is due, whatever else is: an operation on a
-- hold must see it expired the instant its time is up.
local function expire_hold(id, now)
  local at = redis.call('ZSCORE', P .. 'exp', id)
  if at and tonumber(at) <= now then
    finish(id, 'E', now, 'expired')
  end
end

-- A refusal that units of unfinalised expired holds might turn around
-- becomes { 'BUSY' }: the engine sweeps and retries, so expired holds
-- never block a take, even in a burst. When expire_due already knows none
-- is left due, a sold-out answer needs no second look.
local function busy_if_due(stop, now)
  if stop and (stop[1] == 'SHORT' or stop[1] == 'CUSTOMER_LIMIT' or stop[1] == 'TOO_MANY_HOLDS')
      and not none_due
      and #redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, 1) > 0 then
    return { 'BUSY' }
  end
  return stop
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
    local p = redis.call('HMGET', P .. 'pool:' .. l[1],
      'grant', 'ret', 'sold', 'held', 'epoch', 'full', 'unl', 'from', 'until', 'lim')
    if not p[1] or not p[5] then
      need[#need + 1] = l[1]
    else
      local from, till = tonumber(p[8] or '0'), tonumber(p[9] or '0')
      if check_window and ((from > 0 and now < from) or (till > 0 and now >= till)) then
        return { 'NOT_ACTIVE', l[1] }
      end
      l[3] = tonumber(p[5])
      if p[7] ~= '1' then
        local avail = tonumber(p[1]) - tonumber(p[2]) - tonumber(p[3]) - tonumber(p[4])
        local lim = tonumber(p[10] or '-1')
        -- A ceiling below the grant (a cut schedule) is final: no grant helps.
        local capped = lim >= 0 and lim - tonumber(p[3]) - tonumber(p[4]) < avail
        if capped then
          avail = lim - tonumber(p[3]) - tonumber(p[4])
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

-- Checks a per-customer limit; `ck` is '' when the sale has none.
local function check_customer(ck, limit, qty)
  if ck == '' then
    return nil
  end
  local used = tonumber(redis.call('GET', P .. ck) or '0')
  if used + qty > limit then
    return { 'CUSTOMER_LIMIT', tostring(used) }
  end
  return nil
end

-- The state of hold `hk` if it exists and belongs to `job`, else nil: a
-- service never sees, or touches, another job's holds.
local function hold_state(hk, job)
  local h = redis.call('HMGET', hk, 'st', 'job')
  if not h[1] or h[2] ~= job then
    return nil
  end
  return h[1]
end

-- Flags the pools whose grant is running low (headroom at or below `lw`)
-- for the refiller (src/jobs/refiller.rs), so a take rarely has to wait for
-- a grant. Pools that hold all Postgres could give (`full`) never ask.
local function want_refill(lines)
  for _, l in ipairs(lines) do
    local p = redis.call('HMGET', P .. 'pool:' .. l[1], 'grant', 'ret', 'sold', 'held', 'full', 'lw')
    if p[5] ~= '1' and p[6] and
        tonumber(p[1]) - tonumber(p[2]) - tonumber(p[3]) - tonumber(p[4]) <= tonumber(p[6]) then
      redis.call('SADD', P .. 'refill', l[1])
    end
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
-- Returns a reply when the call must stop here, else nil.
local function admit(hk, rq, lines, now, ck, limit)
  if redis.call('EXISTS', hk) == 1 then
    if redis.call('HGET', hk, 'rq') == request_digest(rq) then
      return hold_view(hk)
    end
    return { 'ID_REUSED' }
  end
  return check_lines(lines, now, true) or check_customer(ck, limit, total(lines))
end
