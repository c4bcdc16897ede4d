-- A consumer saw a wake-up published at ARGV[1] (ms): move the frontier, the newest publish
-- time of a consumed wake-up, forward to it, never back (mailbox/wake_marks.py).
-- KEYS[1] the namespace's frontier key; ARGV[1] published_at, ARGV[2] ttl_ms (garbage
-- collection only: a frontier nobody moved for that long is forgotten).
-- Returns the frontier as it is now.
local current = tonumber(redis.call('GET', KEYS[1]))
local seen = tonumber(ARGV[1])
if current and current >= seen then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return seen
