-- Extend a lease that is still ours; tell the holder whether a cancel was requested.
--
-- KEYS: meta, lease
-- ARGV: 1 worker id, 2 epoch, 3 lease ms, 4 '1' to release instead of extending
-- Returns {'ok', cancel_requested} | {'fenced'}.
local meta, lease = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'cancel_requested', 'status')
if m[1] ~= ARGV[2] or m[3] == 'done' or m[3] == 'error' or m[3] == 'cancelled' then
  return {'fenced'}
end
if ARGV[4] == '1' then
  redis.call('DEL', lease)
else
  redis.call('SET', lease, ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
end
return {'ok', m[2] or '0'}
