-- Should a submit publish a wake-up for its thread? Not when one would find nothing to do
-- (docs/behaviour.md#wake-gate). Called after the submit's transaction committed.
-- KEYS[1] the thread's lease key, KEYS[2] its pending-wake key
-- ARGV: now, pending_ttl_ms, wake_id
-- Returns 0 when a claim is in flight: the lease is marked so that its holder claims again
--   when it releases it (a settle always does; a claim that found nothing retries),
-- 2 when a wake-up is already pending (its consumer clears the mark before it claims),
-- 1 when the caller must publish: the mark now names its wake-up.
local lease = redis.call('HMGET', KEYS[1], 'lease_until', 'wake')
local lease_until = tonumber(lease[1])
if lease_until and lease_until >= tonumber(ARGV[1]) then
  if not lease[2] or lease[2] == '' then  -- marked once is enough for a burst of submits
    redis.call('HSET', KEYS[1], 'wake', '1')
  end
  return 0
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 2
