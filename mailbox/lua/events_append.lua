-- Append events to a run's stream and trim it to its budgets: at most ARGV[2] entries and at
-- most ARGV[4] bytes of event payloads, dropping the oldest first (never the event just
-- added). The newest id that trimming dropped is remembered, so a reader behind it gets
-- "cursor expired" instead of a gap. Several events in one call (ARGV[8..]) are appended one
-- after the other exactly as that many calls would append them.
-- KEYS[1] stream key, KEYS[2] meta hash key (dropped_upto, last_id, bytes, len, expires,
-- final); on
-- a Redis Cluster both carry the run's thread as hash tag (docs/redis-cluster.md#keys).
-- ARGV: payload json, max_len, ttl_ms, max_bytes, now_ms, new ('1': the run's stream cannot
-- exist yet, its run was just created), final (a dispatch id, or ''), more payloads...
-- A final report (`final`: the run_finish that ends a dispatch) is appended once per
-- dispatch: when the meta already names that dispatch as reported, nothing is appended and
-- the last id is returned. Two parties that both end the same dispatch (a settle, and the
-- sweep repairing its run meanwhile) then tell followers once.
-- The meta hash keeps the stream's entry count and byte total, so an append needs no XLEN,
-- and when the keys expire (`expires`, in the writers' clock): their TTL is set again only
-- once less than ttl_ms remains, to 1.1 x ttl_ms, so that most appends of a run need no
-- PEXPIRE, and a stream still lives at least ttl_ms after its last event (at most 1.1 x).
-- Returns the id of the last event appended.
local max_len = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4]) or math.huge
local now = tonumber(ARGV[5]) or 0
local meta = redis.call('HMGET', KEYS[2], 'bytes', 'len', 'expires', 'final', 'last_id')
local final = ARGV[7] or ''
if final ~= '' and meta[4] == final then
  return meta[5]
end
local bytes, len, expires = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])
if not bytes or not len then
  -- A new stream, or one whose meta was lost or predates these fields: count it once (a
  -- stream the caller knows to be new has nothing to count).
  bytes, len = 0, 0
  local existing = {}
  if ARGV[6] ~= '1' then
    existing = redis.call('XRANGE', KEYS[1], '-', '+')
  end
  for _, entry in ipairs(existing) do
    bytes = bytes + string.len(entry[2][2])
    len = len + 1
  end
end
local dropped_upto = false

local function append(payload)
  local id = redis.call('XADD', KEYS[1], '*', 'e', payload)
  bytes = bytes + string.len(payload)
  len = len + 1
  while len > max_len or bytes > max_bytes do
    local batch = math.max(len - max_len, 1)
    if batch > 100 then batch = 100 end
    local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', batch)
    local progressed = false
    for _, entry in ipairs(oldest) do
      if entry[1] == id or (len <= max_len and bytes <= max_bytes) then
        break
      end
      redis.call('XDEL', KEYS[1], entry[1])
      bytes = bytes - string.len(entry[2][2])
      len = len - 1
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
for i = 8, #ARGV do
  id = append(ARGV[i])
end
local refresh = not expires or expires - now < ttl
if refresh then
  expires = now + math.floor(ttl * 1.1)
end
local fields = {'last_id', id, 'bytes', bytes, 'len', len, 'expires', expires}
if dropped_upto then
  table.insert(fields, 'dropped_upto')
  table.insert(fields, dropped_upto)
end
if final ~= '' then
  table.insert(fields, 'final')
  table.insert(fields, final)
end
redis.call('HSET', KEYS[2], unpack(fields))
if refresh then  -- after the HSET: a new meta hash exists only from there
  redis.call('PEXPIRE', KEYS[1], expires - now)
  redis.call('PEXPIRE', KEYS[2], expires - now)
end
return id
