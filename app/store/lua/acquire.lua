-- Take the lease of a generation, fencing every earlier holder.
-- Returns {'ok', epoch, last_seq, attempt, cancel_requested} | {'held', holder} |
-- {'already_finished', last_seq} | {'unknown'}.
local m = redis.call('HMGET', meta, 'status', 'last_seq', 'cancel_requested')
local status = m[1]
if not status then return {'unknown'} end
if is_terminal(status) then return {'already_finished', tonumber(m[2]) or 0} end
local holder = redis.call('GET', lease)
if holder then return {'held', holder} end
local epoch = redis.call('HINCRBY', meta, 'epoch', 1)
local attempt = redis.call('HINCRBY', meta, 'attempts', 1)
redis.call('SET', lease, worker_id .. ':' .. epoch, 'PX', lease_ms)
if status == 'queued' then
  local t = redis.call('TIME')
  redis.call('HSET', meta, 'status', 'running',
    'started_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return {'ok', epoch, tonumber(m[2]) or 0, attempt, m[3] or '0'}
