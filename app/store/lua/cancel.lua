-- Mark a generation for cancellation, unless it is gone (never re-create an expired hash).
-- Returns the status, or false when the generation is unknown.
local status = redis.call('HGET', meta, 'status')
if status and not is_terminal(status) then
  redis.call('HSET', meta, 'cancel_requested', '1')
end
return status
