-- Append a batch of events to one generation, atomically.
--
-- KEYS: meta, log, request, lease (all under the generation's hash tag)
-- ARGV: 1 epoch       writer's lease epoch, or '*' for a system writer (cancel of a
--                     queued generation, the abandon sweeper) that fences every worker
--       2 first_seq   seq the writer expects its first event to get ('*' writers: ignored)
--       3 maxlen      length cap of the log (approximate trimming)
--       4 open_ttl    ms an open generation's keys live at least after its last append
--       5 log_ttl     ms the log and request live after the terminal event
--       6 meta_ttl    ms the metadata lives after the terminal event (to answer 410, not 404)
--       7 channel     pub/sub channel of live readers
--       8 final       status after this batch ('' unless its last event is terminal)
--       9 reason      finish reason or error code of the terminal event
--      10 min_idle    '*' writers only: refuse if the generation was active more recently
--                     than this many ms ago ('' = no condition)
--      11 n           number of events, then n pairs of (type, data)
--
-- Returns {code, last_seq}: 'ok' | 'duplicate' (a retry of an applied batch) |
-- 'fenced' | 'already_finished' | 'seq_conflict' | 'unknown' | 'active'.
-- The live message is "first_seq\nappended_ms\ntype\ndata\ntype\ndata..." (event JSON
-- never contains a raw newline).
--
-- Retention: the terminal event sets the log and request to expire log_ttl later and
-- the metadata meta_ttl later. While the generation is open, its TTLs are not set on
-- every append (three PEXPIREs per event): a refresh sets meta, log and request to
-- live open_ttl + open_ttl/8 and records its time in meta's ttl_refreshed_ms, and
-- the first append that finds open_ttl/8 elapsed since (or the clock moved back)
-- refreshes again. So every key of an open generation lives at least open_ttl after
-- its last append, with or without a sweeper. The first append always refreshes: its
-- XADD creates the log, with no TTL.
local meta, log, request, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local epoch, final, n = ARGV[1], ARGV[8], tonumber(ARGV[11])

local m = redis.call('HMGET', meta, 'status', 'last_seq', 'epoch', 'ttl_refreshed_ms')
local status = m[1]
if not status then return {'unknown', 0} end
local last = tonumber(m[2]) or 0
local terminal = status == 'done' or status == 'error' or status == 'cancelled'

local t = redis.call('TIME')
local ms = math.floor(tonumber(t[2]) / 1000)
local now = tonumber(t[1]) * 1000 + ms
-- Lua numbers given to redis.call or concatenated are formatted as floats ('%.17g',
-- '%.14g'), some 7 % of Redis's time per event: what is written goes as integer strings.
local now_s = t[1] .. string.format('%03d', ms)

local first
if epoch == '*' then
  if terminal then return {'already_finished', last} end
  if ARGV[10] ~= '' then
    -- Read here, not by the first HMGET: only the sweeper's closes need them.
    local seen = redis.call('HMGET', meta, 'last_append_ms', 'created_ms')
    local active = tonumber(seen[1]) or tonumber(seen[2]) or 0
    if now - active < tonumber(ARGV[10]) then return {'active', last} end
  end
  redis.call('HINCRBY', meta, 'epoch', 1)
  redis.call('DEL', lease)
  first = last + 1
else
  if m[3] ~= epoch then return {'fenced', last} end
  first = tonumber(ARGV[2])
  if first <= last then
    if first + n - 1 <= last then return {'duplicate', last} end
    return {'seq_conflict', last}
  end
  if first ~= last + 1 then return {'seq_conflict', last} end
  if terminal then return {'already_finished', last} end
end

local live = {string.format('%d', first), now_s}
for i = 0, n - 1 do
  local kind, data = ARGV[12 + 2 * i], ARGV[13 + 2 * i]
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[3], string.format('%d-0', first + i),
    'type', kind, 'data', data, 't', now_s)
  live[#live + 1] = kind
  live[#live + 1] = data
end
last = first + n - 1
local last_s = string.format('%d', last)

if final ~= '' then
  redis.call('HSET', meta, 'last_seq', last_s, 'last_append_ms', now_s,
    'status', final, 'finished_ms', now_s, 'finish_reason', ARGV[9])
  if status == 'queued' then redis.call('HSET', meta, 'started_ms', now_s) end
  redis.call('DEL', lease)
  redis.call('PEXPIRE', log, ARGV[5])
  redis.call('PEXPIRE', request, ARGV[5])
  redis.call('PEXPIRE', meta, ARGV[6])
else
  local open_ttl = tonumber(ARGV[4])
  local slack = math.floor(open_ttl / 8)
  local refreshed = tonumber(m[4])
  if first == 1 or not refreshed or now < refreshed or now - refreshed >= slack then
    redis.call('HSET', meta, 'last_seq', last_s, 'last_append_ms', now_s, 'ttl_refreshed_ms', now_s)
    local ttl = string.format('%d', open_ttl + slack)
    redis.call('PEXPIRE', log, ttl)
    redis.call('PEXPIRE', request, ttl)
    redis.call('PEXPIRE', meta, ttl)
  else
    redis.call('HSET', meta, 'last_seq', last_s, 'last_append_ms', now_s)
  end
end
redis.call('PUBLISH', ARGV[7], table.concat(live, '\n'))
return {'ok', last}
