-- Record which process executes the attempt that holds this lease, and extend the lease to
-- the attempt's start. A second delivery of the same phase message carries the same token,
-- so the token alone cannot refuse it: the executor field can.
-- A lease that Redis forgot (restart, flush) is recreated only when `create` is '1', which
-- the caller passes after SQL recorded the start under this token: a lease is never created
-- for a token SQL has not issued (a forged execute message must not stall the thread).
-- KEYS[1] lease key
-- ARGV: token, executor, dispatch_id, lease_until, ttl_ms, create ('1'/'0'),
--       now (optional: the caller's clock, like lease_until)
-- Returns 'ok', 'missing' (no lease, not created), 'held:<other executor>', or 'lost'
-- (another token holds the thread).
-- The key's TTL: lib/lease_expiry.lua (a recreated lease always gets it).
-- #include lease_expiry
local cur = redis.call('HMGET', KEYS[1], 'token', 'executor', 'lease_until', 'expires')
local ttl, now = tonumber(ARGV[5]), tonumber(ARGV[7])
if not cur[1] then
  if ARGV[6] ~= '1' then
    return 'missing'
  end
  local fields = {'token', ARGV[1], 'dispatch_id', ARGV[3], 'lease_until', ARGV[4],
                  'holder', ARGV[2], 'executor', ARGV[2]}
  if now and ttl then
    table.insert(fields, 'expires')
    table.insert(fields, string.format('%.0f', now + ttl))
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 'ok'
end
if cur[1] ~= ARGV[1] then
  return 'lost'
end
if cur[2] and cur[2] ~= '' and cur[2] ~= ARGV[2] then
  return 'held:' .. cur[2]
end
local fields = {'executor', ARGV[2]}
local lease_until = tonumber(cur[3])
if not lease_until or tonumber(ARGV[4]) > lease_until then
  table.insert(fields, 'lease_until')
  table.insert(fields, ARGV[4])
  lease_until = tonumber(ARGV[4])
end
local refresh = lease_expiry(fields, cur[4], lease_until, ttl, now)
redis.call('HSET', KEYS[1], unpack(fields))
if refresh then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 'ok'
