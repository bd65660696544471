-- Extend a lease that is still ours; tell the holder whether a cancel was requested.
--
-- Returns {'ok', cancel_requested} | {'fenced'} | {'already_finished'}: still ours,
-- but its terminal event is appended (the holder's own: a system close bumps the epoch).
local m = redis.call('HMGET', meta, 'epoch', 'cancel_requested', 'status', 'watched_ms', 'created_ms')
if m[1] ~= epoch then return {'fenced'} end
if is_terminal(m[3]) then return {'already_finished'} end
if release == '1' then
  redis.call('DEL', lease)
else
  redis.call('SET', lease, worker_id .. ':' .. epoch, 'PX', lease_ms)
end
local unwatched = tonumber(unwatched_ms) or 0
if unwatched > 0 and m[2] ~= '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local seen = math.max(tonumber(m[4]) or 0, tonumber(m[5]) or 0)
  if now - seen > unwatched then
    redis.call('HSET', meta, 'cancel_requested', '1')
    return {'ok', '1'}
  end
end
return {'ok', m[2] or '0'}
