-- Delete a thread's lease only if it still carries our token (never someone else's).
-- KEYS[1] lease key; ARGV[1] token. Returns 1 when deleted.
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
