-- A wake was delivered: the webhook answered 2xx, or the pull-wake's event was appended.
-- With `done` (the webhook answered {"done": true}) the wake's snapshot is acked and the
-- wake ends, and a new one is issued if work is still pending.
--
-- Returns {'ok' | 'stale', next_due} | {'missing'}.
local s = load()
if not s then return {'missing'} end
local now = clock_ms()
expire(s, now)
if not is_wake(s, wake_id, generation) then
  save(s)
  return {'stale', next_due(s)}
end
s.retry_count, s.next_attempt, s.status = 0, 0, 'active'
s.deliver_at, s.attempt_until = 0, 0
if done == '1' then
  local shown = redis.call('HGETALL', snapshot)
  for i = 1, #shown, 2 do
    local path, seq = shown[i], tonumber(shown[i + 1])
    if redis.call('HEXISTS', links, path) == 1
        and seq > tonumber(redis.call('HGET', acked, path) or '-1') then
      redis.call('HSET', acked, path, shown[i + 1])
    end
  end
  end_wake(s)
  maybe_wake(s, now, new_wake_id)
end
save(s)
return {'ok', next_due(s)}
