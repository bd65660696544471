-- Extend a lease that is still ours; tell the holder whether a cancel was requested.
--
-- KEYS: meta, lease
-- ARGV: 1 worker id, 2 epoch, 3 lease ms, 4 '1' to release instead of extending,
--       5 unwatched ms: raise the cancel flag when no reader has watched the
--         generation for this long ('0' = the policy is off)
-- Returns {'ok', cancel_requested} | {'fenced'} | {'finished'}: still ours, but its
-- terminal event is appended (the holder's own: a system close bumps the epoch).
local meta, lease = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'cancel_requested', 'status', 'watched_ms', 'created_ms')
if m[1] ~= ARGV[2] then return {'fenced'} end
if m[3] == 'done' or m[3] == 'error' or m[3] == 'cancelled' then return {'finished'} end
if ARGV[4] == '1' then
  redis.call('DEL', lease)
else
  redis.call('SET', lease, ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
end
local unwatched = tonumber(ARGV[5]) or 0
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
