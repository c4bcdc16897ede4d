-- The sweep renews a pending-wake mark whose wake-up may still be queued behind a backlog
-- (mailbox/wake_marks.py): only if the mark still names that wake-up (its consumer may have
-- cleared it, or a newer wake-up replaced it, since the sweep read it).
-- KEYS[1] pending-wake key; ARGV[1] wake id, ARGV[2] ttl_ms. Returns 1 when renewed.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
