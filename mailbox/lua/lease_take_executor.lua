-- Record which process executes the attempt that holds this lease. A second delivery of the
-- same phase message carries the same token, so the token alone cannot refuse it: the
-- executor field can.
-- KEYS[1] lease key
-- ARGV: token, executor, dispatch_id, lease_until, ttl_ms
-- Returns 'ok', 'held:<other executor>', or 'lost' (another token holds the thread).
local cur = redis.call('HMGET', KEYS[1], 'token', 'executor')
if not cur[1] then
  -- Redis forgot the lease (restart, flush): the caller just verified the claim in SQL.
  redis.call('HSET', KEYS[1], 'token', ARGV[1], 'dispatch_id', ARGV[3], 'lease_until', ARGV[4],
             'holder', ARGV[2], 'executor', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 'ok'
end
if cur[1] ~= ARGV[1] then
  return 'lost'
end
if cur[2] and cur[2] ~= '' and cur[2] ~= ARGV[2] then
  return 'held:' .. cur[2]
end
redis.call('HSET', KEYS[1], 'executor', ARGV[2])
return 'ok'
