-- Append to a Durable Stream and/or close it, atomically, with the protocol's checks in
-- its order: closed, content type, producer (so a producer's retry is a duplicate before
-- any Stream-Seq check), Stream-Seq. `body_type` is the media type of the body ('' with
-- none); `stream_seq` must sort after the last one ('' for none). Live readers hear of
-- the write on `channel`, by PUBLISH (SPUBLISH on a cluster).
--
-- Returns {code, last_seq, extra}: 'ok' (extra: '1' when the stream is now closed) |
-- 'duplicate' (a producer's retry; extra: its highest accepted seq) | 'closed' |
-- 'closed_again' (an idempotent close) | 'closed_duplicate' (a retry of the producer
-- request that closed it; extra: its seq) | 'missing' | 'deleted' |
-- 'content_type_mismatch' | 'stale_epoch' (extra: the current epoch) | 'epoch_seq' |
-- 'seq_gap' (extra: the expected seq) | 'stream_seq_regression'.
local with_data = has_data == '1'

-- Byte-wise, whatever the server's locale: Lua's own string comparison uses strcoll.
local function sorts_after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

local m = redis.call('HMGET', meta, 'content_type', 'last_seq', 'closed', 'closed_by',
  'stream_seq', 'ttl', 'expires_ms', 'deleted')
if not m[1] then return {'missing', '0'} end
if m[8] then return {'deleted', m[2]} end
local last = m[2]
local tuple = producer_id ~= '' and (producer_id .. '\n' .. producer_epoch .. '\n' .. producer_seq)
  or ''

if m[3] == '1' then
  if tuple ~= '' and m[4] == tuple then return {'closed_duplicate', last, producer_seq} end
  if close == '1' and not with_data and producer_id == '' then return {'closed_again', last} end
  return {'closed', last}
end
if with_data and media_type(m[1]) ~= body_type then return {'content_type_mismatch', last} end

if producer_id ~= '' then
  local epoch, pseq = tonumber(producer_epoch), tonumber(producer_seq)
  local state = redis.call('HGET', producers, producer_id)
  if state then
    local state_epoch_s, state_seq_s = string.match(state, '^(%d+) (%d+)$')
    local state_epoch, state_seq = tonumber(state_epoch_s), tonumber(state_seq_s)
    if epoch < state_epoch then return {'stale_epoch', last, state_epoch_s} end
    if epoch > state_epoch then
      if pseq ~= 0 then return {'epoch_seq', last} end
    elseif pseq <= state_seq then
      return {'duplicate', last, state_seq_s}
    elseif pseq ~= state_seq + 1 then
      return {'seq_gap', last, string.format('%d', state_seq + 1)}
    end
  elseif pseq ~= 0 then
    return {'seq_gap', last, '0'}
  end
end

if stream_seq ~= '' and m[5] and not sorts_after(stream_seq, m[5]) then
  return {'stream_seq_regression', last}
end

if with_data then
  last = string.format('%d', tonumber(last) + 1)
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, last .. '-0', 'd', data)
end
local fields = {'last_seq', last}
if stream_seq ~= '' then fields[#fields + 1] = 'stream_seq'; fields[#fields + 1] = stream_seq end
if close == '1' then
  fields[#fields + 1] = 'closed'; fields[#fields + 1] = '1'
  if tuple ~= '' then fields[#fields + 1] = 'closed_by'; fields[#fields + 1] = tuple end
end
redis.call('HSET', meta, unpack(fields))
if producer_id ~= '' then
  redis.call('HSET', producers, producer_id, producer_epoch .. ' ' .. producer_seq)
end

-- Every write slides the stream's lifetime (an absolute expiry stays where it is).
keep_stream({meta, log, producers, forks}, m[7], m[6], retention_ms)
redis.call(PUBLISH, channel, last)
return {'ok', last, close == '1' and '1' or ''}
