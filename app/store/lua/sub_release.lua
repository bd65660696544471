-- A worker lets go of the pull-wake it claimed, acking nothing: the wake ends, and a new one
-- (with its event) is issued if work is still pending.
--
-- Returns {'ok', next_due} | {'fenced'} | {'wrong_type'} | {'missing'}.
local s = load()
if not s or s.incarnation ~= incarnation then return {'missing'} end
if s.type ~= 'pull-wake' then return {'wrong_type'} end
local now = clock_ms()
expire(s, now)
if not is_wake(s, wake_id, generation) then
  save(s)
  return {'fenced'}
end
end_wake(s)
maybe_wake(s, now, new_wake_id)
save(s)
return {'ok', next_due(s)}
