-- Take a thread's lease unless a live one exists. A busy thread is refused here, before any
-- SQL. The new lease is "pending" (no dispatch id) until the SQL claim binds it.
-- KEYS[1] lease key; KEYS[2] (optional) the thread's pending-wake key
-- ARGV: token, lease_until, holder, now, ttl_ms, wake_id (optional)
-- A wake-up's claim first clears the pending-wake mark if it names this wake-up, busy thread
-- or not: anything submitted before this point is claimed by this claim or by the holder's
-- next one, so later submits must publish (or flag the lease) again.
-- Returns {1} when taken, or {0, token, dispatch_id, lease_until, holder} of the live lease.
-- A new lease always gets the key's TTL (garbage collection only: validity is lease_until),
-- and `expires` records when that TTL ends in the caller's clock (now + ttl_ms): lease_put
-- and lease_take_executor skip their PEXPIRE while it still covers the lease (see there).
if KEYS[2] and ARGV[6] and redis.call('GET', KEYS[2]) == ARGV[6] then
  redis.call('DEL', KEYS[2])
end
local cur = redis.call('HMGET', KEYS[1], 'token', 'dispatch_id', 'lease_until', 'holder')
if cur[1] and tonumber(cur[3]) and tonumber(cur[3]) >= tonumber(ARGV[4]) then
  return {0, cur[1], cur[2] or '', cur[3], cur[4] or ''}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'dispatch_id', '', 'lease_until', ARGV[2],
           'holder', ARGV[3], 'expires', string.format('%.0f', ARGV[4] + ARGV[5]))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1}
