-- Append to a stream and/or close it, atomically, with the protocol's checks in its order.
--
-- KEYS: meta, log, producers, forks (all under the stream's hash tag)
-- ARGV: 1 media_type    of the request's body ('' when there is no body)
--       2 close         '1': the stream is closed after this append (or without one)
--       3 producer_id   idempotent producer ('' for none), then 4 epoch and 5 seq
--       6 stream_seq    the writer's Stream-Seq ('' for none): must sort after the last one
--       7 retention_ms  sliding retention of a stream with neither TTL nor expiry
--       8 maxlen        length cap of the log (approximate trimming)
--       9 channel       pub/sub channel of live readers
--      10 data          the entry ('' with no body)
--      11 has_data      '1' when there is a body
--
-- Returns {code, last_seq, extra}: 'ok' (extra: '1' when the stream is now closed) |
-- 'duplicate' (a producer's retry; extra: its highest accepted seq) | 'closed' |
-- 'closed_again' (an idempotent close) | 'closed_duplicate' (a retry of the producer
-- request that closed it) | 'missing' | 'deleted' | 'content_type' |
-- 'stale_epoch' (extra: current epoch) | 'epoch_seq' | 'seq_gap' (extra: expected seq) |
-- 'stream_seq'. Checks run in the protocol's precedence: closed, content type,
-- producer (so a producer's retry is a duplicate before any Stream-Seq check), Stream-Seq.
local meta, log, producers, forks = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pid, epoch_s, pseq_s, sseq = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local has_data = ARGV[11] == '1'

local function media(content_type)
  return (string.gsub(content_type, '%s*;.*$', ''))
end

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
local tuple = pid ~= '' and (pid .. '\n' .. epoch_s .. '\n' .. pseq_s) or ''

if m[3] == '1' then
  if tuple ~= '' and m[4] == tuple then return {'closed_duplicate', last, pseq_s} end
  if ARGV[2] == '1' and not has_data and pid == '' then return {'closed_again', last} end
  return {'closed', last}
end
if has_data and media(m[1]) ~= ARGV[1] then return {'content_type', last} end

if pid ~= '' then
  local epoch, pseq = tonumber(epoch_s), tonumber(pseq_s)
  local state = redis.call('HGET', producers, pid)
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

if sseq ~= '' and m[5] and not sorts_after(sseq, m[5]) then return {'stream_seq', last} end

if has_data then
  last = string.format('%d', tonumber(last) + 1)
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[8], last .. '-0', 'd', ARGV[10])
end
local fields = {'last_seq', last}
if sseq ~= '' then fields[#fields + 1] = 'stream_seq'; fields[#fields + 1] = sseq end
if ARGV[2] == '1' then
  fields[#fields + 1] = 'closed'; fields[#fields + 1] = '1'
  if tuple ~= '' then fields[#fields + 1] = 'closed_by'; fields[#fields + 1] = tuple end
end
redis.call('HSET', meta, unpack(fields))
if pid ~= '' then redis.call('HSET', producers, pid, epoch_s .. ' ' .. pseq_s) end

-- Every write slides the stream's lifetime (an absolute expiry stays where it is).
for _, key in ipairs({meta, log, producers, forks}) do
  if m[7] then
    redis.call('PEXPIREAT', key, m[7])
  elseif m[6] then
    redis.call('PEXPIRE', key, m[6] .. '000')
  else
    redis.call('PEXPIRE', key, ARGV[7])
  end
end
redis.call('PUBLISH', ARGV[9], last)
return {'ok', last, ARGV[2] == '1' and '1' or ''}
