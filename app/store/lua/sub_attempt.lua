-- The deliverer of a wake tries again (its earlier attempt failed): still the current wake?
-- Then it has the delivery for `attempt_ms` more, as sub_deliver hands it.
--
-- Returns the wake (see wake_reply) with 'deliver' | {'stale', next_due} | {'missing'}.
local s = load()
if not s then return {'missing'} end
local now = clock_ms()
expire(s, now)
if not is_wake(s, wake_id, generation) or s.deliver_at == 0 then
  save(s)
  return {'stale', next_due(s)}
end
s.attempt_until = now + tonumber(attempt_ms)
if s.type == 'webhook' then
  s.lease_until = math.max(s.lease_until, now + s.lease_ttl_ms)
  take_snapshot()
end
save(s)
return wake_reply('deliver', s)
