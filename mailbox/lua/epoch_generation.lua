-- The generation of this Redis's epoch cache: a random id created on first use. A flush or a
-- restart forgets it, which is how a refill that read SQL before the flush knows to give up.
-- One per server; on a Redis Cluster one per thread, in the thread's slot
-- (docs/redis-cluster.md#epochs), created with a TTL so that those of gone threads go too.
-- KEYS[1] generation key; ARGV[1] a fresh id to use when none exists, ARGV[2] its TTL in ms
-- ('0' or absent: none). Returns the generation.
local gen = redis.call('GET', KEYS[1])
if not gen then
  local ttl = tonumber(ARGV[2] or '0') or 0
  if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
  gen = ARGV[1]
end
return gen
