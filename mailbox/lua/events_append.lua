-- Append events to a run's stream and trim it to its budgets: at most ARGV[2] entries and at
-- most ARGV[4] bytes of event payloads, dropping the oldest first (never the event being
-- added). Several events in one call (ARGV[8..]) are appended one after the other exactly as
-- that many calls would append them.
--
-- The stream keeps its own books, in its newest entry: every entry carries, beside its
-- payload (field 'e', always first), the stream's state once it was appended — 'n' entries
-- and 'b' payload bytes retained, 'x' when the stream expires (in the writers' clock), 'd'
-- the newest id retention dropped (a reader behind it gets "cursor expired", never a gap),
-- 'f' the last dispatch whose final report the stream holds. An append reads the newest
-- entry (XREVRANGE COUNT 1) and writes one entry: no second key to write or to expire. The
-- TTL is set again only once less than ttl_ms remains, to 1.1 x ttl_ms, so most appends of
-- a run need no PEXPIRE, and a stream lives at least ttl_ms after its last event.
-- KEYS[1] stream key; KEYS[2] the meta hash that streams written before kept their books in
-- (dropped_upto, bytes, len, expires, final): read only when the newest entry carries no
-- books, never written. On a Redis Cluster both carry the run's thread as hash tag
-- (docs/redis-cluster.md#keys).
-- ARGV: payload json, max_len, ttl_ms, max_bytes, now_ms, new ('1': the run's stream cannot
-- exist yet, its run was just created: nothing to read), final (a dispatch id, or ''), more
-- payloads...
-- A final report (`final`: the run_finish that ends a dispatch) is appended once per
-- dispatch: when the books already name that dispatch as reported, nothing is appended and
-- the last id is returned. Two parties that both end the same dispatch (a settle, and the
-- sweep repairing its run meanwhile) then tell followers once.
-- Returns the id of the last event appended.
local max_len = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4]) or math.huge
local now = tonumber(ARGV[5]) or 0
local final = ARGV[7] or ''
local len, bytes, expires, dropped, reported, last_id = 0, 0, nil, '', '', false

if ARGV[6] ~= '1' then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  if newest then
    last_id = newest[1]
    local books = {}
    for i = 1, #newest[2], 2 do
      books[newest[2][i]] = newest[2][i + 1]
    end
    if books['n'] and books['b'] then
      len, bytes, expires = tonumber(books['n']), tonumber(books['b']), tonumber(books['x'])
      dropped, reported = books['d'] or '', books['f'] or ''
    else
      -- Written before the stream kept its books: take them from the old meta hash, and
      -- count the stream once when even that does not know.
      local meta = redis.call('HMGET', KEYS[2], 'bytes', 'len', 'expires', 'final',
                              'dropped_upto')
      bytes, len, expires = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])
      reported, dropped = meta[4] or '', meta[5] or ''
      if not bytes or not len then
        bytes, len = 0, 0
        for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
          bytes = bytes + string.len(entry[2][2])
          len = len + 1
        end
      end
    end
  end
end
if final ~= '' and reported == final then
  return last_id
end

local refresh = not expires or expires - now < ttl
if refresh then
  expires = now + math.floor(ttl * 1.1)
end
if final ~= '' then
  reported = final
end

local function make_room(size)
  -- Drop the oldest until the new event fits (or nothing older is left).
  while len > 0 and (len + 1 > max_len or bytes + size > max_bytes) do
    local batch = math.min(math.max(len + 1 - max_len, 1), 100)
    local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', batch)
    if #oldest == 0 then  -- the books counted entries that are gone: nothing left to drop
      len, bytes = 0, 0
      break
    end
    for _, entry in ipairs(oldest) do
      if len + 1 <= max_len and bytes + size <= max_bytes then
        break
      end
      redis.call('XDEL', KEYS[1], entry[1])
      bytes = bytes - string.len(entry[2][2])
      len = len - 1
      dropped = entry[1]
    end
  end
end

local function append(payload)
  local size = string.len(payload)
  make_room(size)
  len = len + 1
  bytes = bytes + size
  local fields = {'e', payload, 'n', len, 'b', bytes, 'x', expires}
  if dropped ~= '' then
    table.insert(fields, 'd')
    table.insert(fields, dropped)
  end
  if reported ~= '' then
    table.insert(fields, 'f')
    table.insert(fields, reported)
  end
  return redis.call('XADD', KEYS[1], '*', unpack(fields))
end

local id = append(ARGV[1])
for i = 8, #ARGV do
  id = append(ARGV[i])
end
if refresh then  -- after the XADD: a new stream exists only from there
  redis.call('PEXPIRE', KEYS[1], expires - now)
end
return id
