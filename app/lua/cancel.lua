-- Mark a generation for cancellation, unless it is gone (never re-create an expired hash).
-- KEYS: meta. Returns the status, or false when the generation is unknown.
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'done' and status ~= 'error' and status ~= 'cancelled' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
return status
