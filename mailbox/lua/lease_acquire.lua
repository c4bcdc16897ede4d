-- Take a thread's lease unless a live one exists. A busy thread is refused here, before any
-- SQL. The new lease is "pending" (no dispatch id) until the SQL claim binds it.
-- KEYS[1] lease key
-- ARGV: token, lease_until, holder, now, ttl_ms
-- Returns {1} when taken, or {0, token, dispatch_id, lease_until, holder} of the live lease.
local cur = redis.call('HMGET', KEYS[1], 'token', 'dispatch_id', 'lease_until', 'holder')
if cur[1] and tonumber(cur[3]) and tonumber(cur[3]) >= tonumber(ARGV[4]) then
  return {0, cur[1], cur[2] or '', cur[3], cur[4] or ''}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'dispatch_id', '', 'lease_until', ARGV[2],
           'holder', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1}
