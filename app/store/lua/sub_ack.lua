-- A callback (webhook) or an ack (pull-wake) for the wake `generation`/`wake_id` of the
-- subscription incarnation the caller checked the token of. `acks` are triples (path, seq,
-- the stream's tail as the caller read it): each moves its stream's cursor forward, within
-- the tail. It extends the lease; with `done` the wake ends, and a new one is issued if work
-- is still pending. A valid callback also ends the webhook's delivery retries.
--
-- Returns {'ok', next_due, next_wake ('1' or '')} | {'fenced'} | {'invalid_offset', why,
-- path} | {'wrong_type'} | {'missing'}.
local s = load()
if not s or s.incarnation ~= incarnation then return {'missing'} end
if s.type ~= subscription_type then return {'wrong_type'} end
local now = clock_ms()
expire(s, now)
if not is_wake(s, wake_id, generation) then
  save(s)
  return {'fenced'}
end
local count = (#ARGV - acks_from + 1) / 3
for n = 0, count - 1 do
  local path, seq = ARGV[acks_from + 3 * n], tonumber(ARGV[acks_from + 3 * n + 1])
  if redis.call('HEXISTS', links, path) == 0 then
    save(s)
    return {'invalid_offset', 'unknown', path}
  end
  if seq < tonumber(redis.call('HGET', acked, path)) then
    save(s)
    return {'invalid_offset', 'behind', path}
  end
  local read = tonumber(ARGV[acks_from + 3 * n + 2]) or 0
  local tail = math.max(tonumber(redis.call('HGET', tails, path)), read)
  if seq > tail then
    save(s)
    return {'invalid_offset', 'beyond', path}
  end
end
for n = 0, count - 1 do
  local path, read = ARGV[acks_from + 3 * n], tonumber(ARGV[acks_from + 3 * n + 2])
  redis.call('HSET', acked, path, ARGV[acks_from + 3 * n + 1])
  if read and read > tonumber(redis.call('HGET', tails, path)) then
    redis.call('HSET', tails, path, string.format('%d', read))
  end
end
s.lease_until = now + s.lease_ttl_ms
if s.type == 'webhook' then
  s.deliver_at, s.attempt_until, s.retry_count, s.next_attempt, s.status = 0, 0, 0, 0, 'active'
end
local next_wake = false
if done == '1' then
  end_wake(s)
  next_wake = maybe_wake(s, now, new_wake_id)
end
save(s)
return {'ok', next_due(s), next_wake and '1' or ''}
