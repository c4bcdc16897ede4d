-- Forget the cached epochs of threads whose epoch rows garbage collection deleted, and renew
-- the cache generation: a refill that read the old epoch from SQL before the delete was
-- taken under the old generation, so epoch_fill.lua refuses it instead of caching a value
-- above SQL (docs/behaviour.md#gc).
-- KEYS[1] generation key, KEYS[2..] epoch keys; ARGV[1] a fresh generation id.
-- Returns how many epoch keys existed.
redis.call('SET', KEYS[1], ARGV[1])
local gone = 0
for i = 2, #KEYS do
  gone = gone + redis.call('DEL', KEYS[i])
end
return gone
