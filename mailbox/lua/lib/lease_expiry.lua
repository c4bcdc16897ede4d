-- The lease key's TTL rule, shared by lease_put.lua and lease_take_executor.lua (included
-- where they say `-- #include lease_expiry`, by coordination.lua_source).
-- The key's TTL is garbage collection only (validity is lease_until). The field `expires`
-- says when the TTL last set ends, in the callers' clock (its setter's now + ttl_ms). With
-- margin = ttl_ms/3, the TTL is set again (PEXPIRE ttl_ms, `expires` = now + ttl_ms) unless
--   lease_until + margin <= expires <= now + ttl_ms + margin
-- (lease_until: the lease's end after the call): a missing or unparseable `expires` (a lease
-- an older script wrote), one too close to lease_until, or one further out than this
-- caller's own TTL would reach by more than the margin (a clock ahead of ours) all set it.
-- Otherwise no PEXPIRE: the TTL set before still outlives lease_until by the margin. A
-- refresh gives now + ttl_ms, which outlives lease_until by the margin whenever
-- lease_until <= now + 2 * ttl_ms/3 (ttl_ms is at least 3 leases, coordination._lease_ttl).
-- Without `now` (an older caller) the TTL is set every time, as it always was, and a stored
-- `expires` is blanked (the TTL just set is not recorded).
-- Appends the `expires` field to write (if any) to `fields`; returns whether to PEXPIRE.
local function lease_expiry(fields, stored, lease_until, ttl, now)
  if now and ttl then
    local expires = tonumber(stored)
    local margin = ttl / 3
    if expires and lease_until and expires >= lease_until + margin
        and expires <= now + ttl + margin then
      return false
    end
    table.insert(fields, 'expires')
    table.insert(fields, string.format('%.0f', now + ttl))
  elseif stored and stored ~= '' then
    table.insert(fields, 'expires')
    table.insert(fields, '')
  end
  return true
end
