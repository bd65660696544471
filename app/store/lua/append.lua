-- Append a batch of events to one generation, atomically.
--
-- Returns {code, last_seq}: 'ok' | 'duplicate' (a retry of an applied batch) |
-- 'fenced' | 'already_finished' | 'seq_conflict' | 'unknown' | 'active'.
-- The live message is "first_seq\nappended_ms\ntype\ndata\ntype\ndata..." (event JSON
-- never contains a raw newline), published with PUBLISH, or SPUBLISH on a cluster.
--
-- Retention: the terminal event sets the log and request to expire log_ttl_ms later and
-- the metadata meta_ttl_ms later. While the generation is open, its TTLs are not set on
-- every append (three PEXPIREs per event): a refresh sets meta, log and request to
-- live open_ttl + open_ttl/8 and records its time in meta's ttl_refreshed_ms, and
-- the first append that finds open_ttl/8 elapsed since (or the clock moved back)
-- refreshes again. So every key of an open generation lives at least open_ttl after
-- its last append, with or without a sweeper. The first append always refreshes: its
-- XADD creates the log, with no TTL.
local count = tonumber(n)

local m = redis.call('HMGET', meta, 'status', 'last_seq', 'epoch', 'ttl_refreshed_ms')
local status = m[1]
if not status then return {'unknown', 0} end
local last = tonumber(m[2]) or 0
local terminal = is_terminal(status)

local t = redis.call('TIME')
local ms = math.floor(tonumber(t[2]) / 1000)
local now = tonumber(t[1]) * 1000 + ms
-- Lua numbers given to redis.call or concatenated are formatted as floats ('%.17g',
-- '%.14g'), some 7 % of Redis's time per event: what is written goes as integer strings.
local now_s = t[1] .. string.format('%03d', ms)

local first
if epoch == '*' then
  if terminal then return {'already_finished', last} end
  if min_idle_ms ~= '' then
    -- Read here, not by the first HMGET: only the sweeper's closes need them.
    local seen = redis.call('HMGET', meta, 'last_append_ms', 'created_ms')
    local active = tonumber(seen[1]) or tonumber(seen[2]) or 0
    if now - active < tonumber(min_idle_ms) then return {'active', last} end
  end
  redis.call('HINCRBY', meta, 'epoch', 1)
  redis.call('DEL', lease)
  first = last + 1
else
  if m[3] ~= epoch then return {'fenced', last} end
  first = tonumber(first_seq)
  if first <= last then
    if first + count - 1 <= last then return {'duplicate', last} end
    return {'seq_conflict', last}
  end
  if first ~= last + 1 then return {'seq_conflict', last} end
  if terminal then return {'already_finished', last} end
end

local live = {string.format('%d', first), now_s}
for i = 0, count - 1 do
  local kind, data = ARGV[events_from + 2 * i], ARGV[events_from + 1 + 2 * i]
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, string.format('%d-0', first + i),
    'type', kind, 'data', data, 't', now_s)
  live[#live + 1] = kind
  live[#live + 1] = data
end
last = first + count - 1
local last_s = string.format('%d', last)

if final ~= '' then
  redis.call('HSET', meta, 'last_seq', last_s, 'last_append_ms', now_s,
    'status', final, 'finished_ms', now_s, 'finish_reason', reason)
  if status == 'queued' then redis.call('HSET', meta, 'started_ms', now_s) end
  redis.call('DEL', lease)
  redis.call('PEXPIRE', log, log_ttl_ms)
  redis.call('PEXPIRE', request, log_ttl_ms)
  redis.call('PEXPIRE', meta, meta_ttl_ms)
else
  local open_ttl = tonumber(open_ttl_ms)
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
redis.call(PUBLISH, channel, table.concat(live, '\n'))
return {'ok', last}
