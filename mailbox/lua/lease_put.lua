-- Compare-and-set a thread's lease: write it only when the current token is the expected one,
-- or (when allowed) when no lease exists at all, e.g. after Redis lost its data. A lease
-- handed to another claim (a new token: a settle's ack claimed the thread's next dispatch,
-- or a lease rebuilt for the claim SQL holds) loses the old attempt's executor and the mark
-- a submit left on it (wake_gate.lua): the new holder's own settle looks for due work, as
-- every ending of a claim does, so nobody needs to claim again for that submit.
-- KEYS[1] lease key
-- ARGV: expected_token, allow_missing ('1'/'0'), token, dispatch_id, lease_until, holder, ttl_ms,
--       now (optional: the caller's clock, like lease_until)
-- Returns 1 when written, 0 when another token holds the key.
-- The key's TTL: lib/lease_expiry.lua.
-- #include lease_expiry
local cur = redis.call('HMGET', KEYS[1], 'token', 'expires')
local token = cur[1]
if (not token and ARGV[2] == '1') or (token and token == ARGV[1]) then
  local fields = {'token', ARGV[3], 'dispatch_id', ARGV[4], 'lease_until', ARGV[5],
                  'holder', ARGV[6]}
  if token and token ~= ARGV[3] then  -- '' counts as none (take_executor, release, the gate)
    table.insert(fields, 'executor')
    table.insert(fields, '')
    table.insert(fields, 'wake')
    table.insert(fields, '')
  end
  local refresh = lease_expiry(fields, cur[2], tonumber(ARGV[5]), tonumber(ARGV[7]),
                                tonumber(ARGV[8]))
  redis.call('HSET', KEYS[1], unpack(fields))
  if refresh then
    redis.call('PEXPIRE', KEYS[1], ARGV[7])
  end
  return 1
end
return 0
