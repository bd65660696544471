-- Look at a subscription that is due: end a lease that ran out, issue a wake if it is idle
-- with pending work, and hand its delivery to the caller if it is due and no other reader is
-- making it (the caller has it for `attempt_ms`). A webhook's lease runs from each attempt,
-- and the tails it shows become the wake's snapshot.
--
-- Returns the wake (see wake_reply) with 'deliver' | {'wait', next_due} | {'missing'}.
local s = load()
if not s then return {'missing'} end
local now = clock_ms()
expire(s, now)
maybe_wake(s, now, new_wake_id)
if s.wake_id ~= '' and s.deliver_at > 0 and s.deliver_at <= now and s.attempt_until <= now then
  s.attempt_until = now + tonumber(attempt_ms)
  if s.type == 'webhook' then
    s.lease_until = math.max(s.lease_until, now + s.lease_ttl_ms)
    take_snapshot()
  end
  save(s)
  return wake_reply('deliver', s)
end
save(s)
return {'wait', next_due(s)}
