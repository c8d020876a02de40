-- sweep.lua: end holds whose time is up (the sweeper's one call, and what
-- a take that answered BUSY waits for).
-- Scripts already treat an expired hold as absent; this gives back the
-- units of the expiry buckets that have filled even when no other call
-- touches the tenant, and makes the EXPIRED state and its event real,
-- paced by the caller (lib.lua, "Ending an expired hold is two things").
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua)
--       4 most holds (and bucket sums' fields) to end in this call, from
--         full buckets and from the partial ones each (lib.lua, the expiry
--         index)
--       5 '1' to end the partial buckets' due holds too (what a take that
--         answered BUSY needs), '0' to leave them for when their bucket is
--         full (the sweeper's rounds: finding them means reading every
--         hold of the bucket)
--       6 most Q holds whose units are back to write EXPIRED (book_expired)
-- Returns { ended, still_due (1 when some units may still be out, else 0),
--           lag_ms_of_oldest_ended, booked, lag_ms_of_oldest_booked,
--           still_to_book (1 or 0) }.

local limit, now_too, book = tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
local now = now_ms()

-- Holds made before the expiry index was bucketed (a sorted set `exp` of
-- hold id -> expiry, counted by ZCARD) move into the buckets, `limit` per
-- call, so an upgraded Redis keeps every promise within a few rounds.
local legacy = redis.call('ZRANGE', P .. 'exp', 0, limit - 1, 'WITHSCORES')
for i = 1, #legacy, 2 do
  if redis.call('HGET', P .. 'hold:' .. legacy[i], 'st') == 'A' then
    index_expiry(legacy[i], tonumber(legacy[i + 1]), 'due')
    active_add(1)
  end
  redis.call('ZREM', P .. 'exp', legacy[i])
end
give_back_due(now, limit)
local n, earliest = expire_due(now, limit)
earliest = earlier(earliest, back_oldest)
local left = 0
if none_due and all_back and now_too then
  -- Every full bucket is done: the partial ones' due holds too.
  local due = due_in_partial(now, limit)
  local m, at = finish_all(due, 'E', now, 'expired', now)
  n = n + m
  earliest = earlier(earliest, at)
  if #due >= limit then
    left = 1
  end
elseif not (none_due and all_back) then
  left = 1
end
local lag = 0
if earliest then
  lag = now - earliest
end
local booked, book_lag, book_left = 0, 0, 0
if book > 0 then
  local m, at, more = book_expired(now, book)
  booked = m
  if at then
    book_lag = now - at
  end
  if more then
    book_left = 1
  end
end
return { n, left, lag, booked, book_lag, book_left }
