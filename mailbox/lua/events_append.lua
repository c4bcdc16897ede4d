-- Append events to a run's stream and trim it to its budgets: at most ARGV[2] entries and at
-- most ARGV[4] bytes of event payloads, dropping the oldest first (never the event just
-- added). The newest id that trimming dropped is remembered, so a reader behind it gets
-- "cursor expired" instead of a gap. Several events in one call (ARGV[5..]) are appended one
-- after the other exactly as that many calls would append them.
-- KEYS[1] stream key, KEYS[2] meta hash key (dropped_upto, last_id, bytes); on a Redis
-- Cluster both carry the run's thread as hash tag (docs/redis-cluster.md#keys).
-- ARGV: payload json, max_len, ttl_ms, max_bytes, more payloads...
-- Returns the id of the last event appended.
local max_len = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[4]) or math.huge
local bytes = redis.call('HGET', KEYS[2], 'bytes')
if bytes then
  bytes = tonumber(bytes)
else
  -- A stream written before the byte budget (or whose meta was lost): count it once.
  bytes = 0
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
    bytes = bytes + string.len(entry[2][2])
  end
end
local dropped_upto = false

local function append(payload)
  local id = redis.call('XADD', KEYS[1], '*', 'e', payload)
  bytes = bytes + string.len(payload)
  local excess = redis.call('XLEN', KEYS[1]) - max_len
  while excess > 0 or bytes > max_bytes do
    local batch = math.max(excess, 1)
    if batch > 100 then batch = 100 end
    local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', batch)
    local progressed = false
    for _, entry in ipairs(oldest) do
      if entry[1] == id or (excess <= 0 and bytes <= max_bytes) then
        break
      end
      redis.call('XDEL', KEYS[1], entry[1])
      bytes = bytes - string.len(entry[2][2])
      excess = excess - 1
      dropped_upto = entry[1]
      progressed = true
    end
    if not progressed then
      break
    end
  end
  return id
end

local id = append(ARGV[1])
for i = 5, #ARGV do
  id = append(ARGV[i])
end
if dropped_upto then
  redis.call('HSET', KEYS[2], 'dropped_upto', dropped_upto)
end
redis.call('HSET', KEYS[2], 'last_id', id, 'bytes', bytes)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return id
