-- Take the lease of a generation, fencing every earlier holder.
-- Returns {'ok', epoch, last_seq, attempt, cancel_requested} | {'held', holder} |
-- {'already_finished', last_seq} | {'unknown'}.
local m = redis.call('HMGET', meta, 'status', 'last_seq', 'cancel_requested')
local status = m[1]
if not status then return {'unknown'} end
if is_terminal(status) then return {'already_finished', tonumber(m[2]) or 0} end
local holder = redis.call('GET', lease)
if holder then return {'held', holder} end
-- Epochs grow by a step that varies, not by 1: when Redis comes back with an older copy
-- of the data, an acquire it lost would otherwise be handed out again, and the worker
-- still holding it would pass for the new holder.
local t = redis.call('TIME')
local epoch = redis.call('HINCRBY', meta, 'epoch', 1 + tonumber(t[2]) % 1024)
-- Where this epoch begins: a writer fenced by it, whose appends the log confirmed past
-- this seq, knows the log went back before it was taken (reset.lua).
redis.call('HSET', meta, 'epoch_from', m[2] or '0')
local attempt = redis.call('HINCRBY', meta, 'attempts', 1)
redis.call('SET', lease, worker_id .. ':' .. epoch, 'PX', lease_ms)
if status == 'queued' then
  redis.call('HSET', meta, 'status', 'running',
    'started_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return {'ok', epoch, tonumber(m[2]) or 0, attempt, m[3] or '0'}
