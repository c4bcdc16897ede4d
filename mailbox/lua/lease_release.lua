-- Delete a thread's lease only if it still carries our token (never someone else's).
-- KEYS[1] lease key; ARGV[1] token. Returns 1 when deleted, 2 when deleted and a submit
-- marked the lease while it stood (wake_gate.lua): the caller must claim again, 0 when the
-- lease is not ours.
local cur = redis.call('HMGET', KEYS[1], 'token', 'wake')
if cur[1] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if cur[2] and cur[2] ~= '' then
    return 2
  end
  return 1
end
return 0
