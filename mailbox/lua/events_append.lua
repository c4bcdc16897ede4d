-- Append one event to a run's stream, keep at most ARGV[2] entries, and remember the newest
-- id that trimming dropped, so a reader behind it gets "cursor expired" instead of a gap.
-- KEYS[1] stream key, KEYS[2] meta hash key
-- ARGV: payload json, max_len, ttl_ms
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
local max_len = tonumber(ARGV[2])
local excess = redis.call('XLEN', KEYS[1]) - max_len
if excess > 0 then
  local dropped = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
  redis.call('HSET', KEYS[2], 'dropped_upto', dropped[#dropped][1])
  for _, entry in ipairs(dropped) do
    redis.call('XDEL', KEYS[1], entry[1])
  end
end
redis.call('HSET', KEYS[2], 'last_id', id)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return id
