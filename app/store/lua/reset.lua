-- Record that a generation's log went back: Redis came back with an older copy of it
-- (a replica promoted before it had the last writes, a restore from a snapshot, a host
-- crash with appendfsync everysec), so seqs a writer appended, which clients may hold,
-- are missing, or stand for what another writer appended since.
--
-- Called by the writer that may find it out, with what it knows: its lease epoch, the
-- last seq the log confirmed to it (confirmed_to) and the last seq it sent at all
-- (sent_to). The log went back if it lacks a confirmed seq, or if it was taken over by
-- an epoch that began before a confirmed seq (epoch_from, set by acquire.lua): that
-- holder started from a copy without them, and what it appended reuses their seqs.
--
-- Then a `reset` entry is appended at a seq past everything the writer sent, so no seq
-- names two different events: seqs from_seq .. (its seq - 1) are void, the log has no
-- entries there and never will. Every writer is fenced, and the lease dropped: the next
-- holder continues the generation from the log.
--
-- Returns {'reset', seq, from_seq} | {'intact', last_seq} | {'already_finished', last_seq}
-- | {'unknown', 0}.
local m = redis.call('HMGET', meta, 'status', 'last_seq', 'epoch', 'epoch_from')
if not m[1] then return {'unknown', 0} end
local last = tonumber(m[2]) or 0
local confirmed = tonumber(confirmed_to)
local from = last + 1
if m[3] ~= epoch and m[4] and tonumber(m[4]) < confirmed then
  from = math.min(from, tonumber(m[4]) + 1)
end
if last >= confirmed and from > last then return {'intact', last} end
if is_terminal(m[1]) then return {'already_finished', last} end

local seq = math.max(last, tonumber(sent_to)) + 1
local t = redis.call('TIME')
local now_s = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
local seq_s, from_s = string.format('%d', seq), string.format('%d', from)
local data = '{"type":"reset","from_seq":' .. from_s .. '}'
redis.call('XADD', log, 'MAXLEN', '~', maxlen, seq_s .. '-0', 'type', 'reset', 'data', data,
  't', now_s)
-- ttl_refreshed_ms goes: the next append sets every TTL again (the XADD may have made
-- the log anew, with none).
redis.call('HSET', meta, 'last_seq', seq_s, 'last_append_ms', now_s, 'epoch_from', seq_s)
redis.call('HDEL', meta, 'ttl_refreshed_ms')
redis.call('HINCRBY', meta, 'epoch', 1)
redis.call('DEL', lease)
redis.call(PUBLISH, channel, table.concat({seq_s, now_s, 'reset', data}, '\n'))
return {'reset', seq, from}
