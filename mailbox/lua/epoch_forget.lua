-- Forget the cached epochs of threads whose epoch rows garbage collection deleted, and renew
-- the cache generation: a refill that read the old epoch from SQL before the delete was
-- taken under the old generation, so epoch_fill.lua refuses it instead of caching a value
-- above SQL (docs/behaviour.md#gc). On one server the generation is global and one call
-- forgets many threads; on a Redis Cluster each thread has its own, in its slot, and a call
-- forgets one thread (docs/redis-cluster.md#epochs).
-- KEYS[1] generation key, KEYS[2..] epoch keys; ARGV[1] a fresh generation id, ARGV[2] its
-- TTL in ms ('0' or absent: none).
-- Returns how many epoch keys existed.
local ttl = tonumber(ARGV[2] or '0') or 0
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
local gone = 0
for i = 2, #KEYS do
  gone = gone + redis.call('DEL', KEYS[i])
end
return gone
