-- The generation of this Redis's epoch cache: a random id created on first use. A flush or a
-- restart forgets it, which is how a refill that read SQL before the flush knows to give up.
-- KEYS[1] generation key; ARGV[1] a fresh id to use when none exists. Returns the generation.
local gen = redis.call('GET', KEYS[1])
if not gen then
  redis.call('SET', KEYS[1], ARGV[1])
  gen = ARGV[1]
end
return gen
