-- A worker claims a pull-wake subscription: the wake in flight (one is issued if there is
-- pending work and none), under a lease of the subscription's lease_ttl_ms. The tails it is
-- shown become the wake's snapshot.
--
-- Returns the wake (see wake_reply) with 'ok' | {'claimed', holder, generation} | {'idle'}
-- | {'wrong_type'} | {'missing'}.
local s = load()
if not s then return {'missing'} end
if s.type ~= 'pull-wake' then return {'wrong_type'} end
local now = clock_ms()
expire(s, now)
if s.holder ~= '' then
  save(s)
  return {'claimed', s.holder, int(s.generation)}
end
if not pending() then
  end_wake(s)
  save(s)
  return {'idle'}
end
maybe_wake(s, now, new_wake_id)
s.holder = worker
s.lease_until = now + s.lease_ttl_ms
-- The claimer has the wake: its event need not be appended any more.
s.deliver_at, s.attempt_until = 0, 0
take_snapshot()
save(s)
return wake_reply('ok', s)
