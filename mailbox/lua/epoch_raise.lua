-- Raise the cached thread epoch to ARGV[1] if that is higher: the cache never goes back.
-- KEYS[1] epoch key; ARGV: epoch, ttl_ms. Returns the cached value after the call.
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if new > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return new
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return cur
