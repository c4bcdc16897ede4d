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
-- The key's TTL is garbage collection only (validity is lease_until). The field `expires`
-- says when the TTL last set ends, in the callers' clock (its setter's now + ttl_ms). With
-- margin = ttl_ms/3, the TTL is set again (PEXPIRE ttl_ms, `expires` = now + ttl_ms) unless
--   lease_until + margin <= expires <= now + ttl_ms + margin
-- (lease_until as written by this call): a missing or unparseable `expires` (a lease an
-- older script wrote), one too close to lease_until, or one further out than this caller's
-- own TTL would reach by more than the margin (a clock ahead of ours) all set it. Otherwise
-- no PEXPIRE: the TTL set before still outlives lease_until by the margin. A refresh gives
-- now + ttl_ms, which outlives lease_until by the margin whenever lease_until <= now +
-- 2 * ttl_ms/3 (ttl_ms is at least 3 leases, coordination._lease_ttl). Without `now` (an
-- older caller) the TTL is set every time, as it always was, and a stored `expires` is
-- blanked (the TTL just set is not recorded).
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
  local ttl, now = tonumber(ARGV[7]), tonumber(ARGV[8])
  local expires, lease_until = tonumber(cur[2]), tonumber(ARGV[5])
  local refresh = true
  if now and ttl then
    local margin = ttl / 3
    if expires and lease_until and expires >= lease_until + margin
        and expires <= now + ttl + margin then
      refresh = false
    else
      table.insert(fields, 'expires')
      table.insert(fields, string.format('%.0f', now + ttl))
    end
  elseif cur[2] and cur[2] ~= '' then
    table.insert(fields, 'expires')
    table.insert(fields, '')
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  if refresh then
    redis.call('PEXPIRE', KEYS[1], ARGV[7])
  end
  return 1
end
return 0
