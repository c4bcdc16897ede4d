-- Fill the cached epoch from a SQL read, but only if the cache's generation is still the one
-- seen before that read (no flush or restart in between) and only upwards.
-- KEYS[1] epoch key, KEYS[2] generation key; ARGV: epoch, generation, ttl_ms.
-- Returns the cached value after the call, or -1 when the generation changed.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return -1
end
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if new > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return new
end
return cur
