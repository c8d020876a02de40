-- batch.lua: several hold operations of one tenant in one call.
--
-- The end of the batch library. The Rust side (src/store/redis/scripts.rs)
-- builds the library from lib.lua, then each operation's file wrapped as a
-- function of its own ARGV (`local function op_claim(ARGV) <claim.lua>
-- end`, ...), then this file, and loads it once (FUNCTION LOAD): its
-- functions are defined at load, not on every call, which is most of what
-- a script call costs before it does anything (deploy/BENCHMARKS.md,
-- 2026-12-03, late). The library and its function are named after a digest
-- of their text (HOLDFAST_BATCH below is replaced with that name), so
-- daemons of different builds on one Redis each call their own.
--
-- The engine's coalescer (src/store/redis/batch.rs) sends the operations
-- that queued up while its previous call was in flight as one FCALL, so
-- Redis parses, dispatches and answers one command instead of dozens. Each
-- operation runs exactly as its own script would, one after the other; the
-- call as a whole is atomic, as every script is.
--
-- KEYS  none (see reserve.lua)
-- ARGV  1 prefix, 2 retention ms, 3 now ms (see lib.lua), shared by all
--       then, for each operation: its name, n, and its own ARGV[4..3+n]
-- Returns one reply per operation, in order, each as its script would have
--       answered (false, read as nil, where a script answered nothing), or
--       { 'SCRIPT_ERROR', message } for an operation that raised an error:
--       that one fails alone, as its own script call would have, and the
--       others still run (an operation checks before it writes, so a raised
--       error has changed nothing).

local OPS = {
  reserve = op_reserve,
  claim = op_claim,
  commit = op_commit,
  release = op_release,
  extend = op_extend,
  get_hold = op_get_hold,
}

redis.register_function('HOLDFAST_BATCH', function(KEYS, ARGV)
  begin(ARGV)
  local replies = {}
  local i = 4
  while i <= #ARGV do
    local op, n = OPS[ARGV[i]], tonumber(ARGV[i + 1])
    local args = { ARGV[1], ARGV[2], ARGV[3] }
    for j = 1, n do
      args[3 + j] = ARGV[i + 1 + j]
    end
    local ok, reply = pcall(op, args)
    if not ok then
      reply = { 'SCRIPT_ERROR', type(reply) == 'table' and tostring(reply.err) or tostring(reply) }
    end
    replies[#replies + 1] = reply or false
    i = i + 2 + n
  end
  settle()
  return replies
end)
