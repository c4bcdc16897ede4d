-- A sweep's wake-up was consumed: clear the thread's pending-wake mark, but only if it still
-- names this wake-up (a later sweep's mark, set after ours expired, stays in place).
-- KEYS[1] pending-wake key; ARGV[1] wake id. Returns 1 when deleted.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
