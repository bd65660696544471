-- A delivery failed: it is tried again `delay_ms` from now, by the same reader if it lives
-- (it keeps the delivery until `attempt_ms` after that), else by whichever reader finds it
-- due then. The subscription's status is 'failed' until a delivery succeeds.
--
-- Returns {'retry', next_due} | {'stale', next_due} | {'missing'}.
local s = load()
if not s then return {'missing'} end
local now = clock_ms()
expire(s, now)
if not is_wake(s, wake_id, generation) then
  save(s)
  return {'stale', next_due(s)}
end
s.retry_count = s.retry_count + 1
s.status = 'failed'
s.next_attempt = now + tonumber(delay_ms)
s.deliver_at = s.next_attempt
s.attempt_until = s.next_attempt + tonumber(attempt_ms)
save(s)
return {'retry', next_due(s)}
