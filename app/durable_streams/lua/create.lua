-- Create a stream, or answer whether an existing one matches the request (PUT is idempotent).
--
-- KEYS: meta, log, producers, forks (all under the stream's hash tag)
-- ARGV: 1 content_type  normalized; the media type (before ';') must match an existing one
--       2 ttl           sliding TTL in seconds ('' for none)
--       3 expires_ms    absolute expiry, epoch ms ('' for none)
--       4 closed        '1' to create the stream closed
--       5 fork_of       source stream name ('' when not a fork)
--       6 fork_seq      the source position the fork continues from ('' when not a fork)
--       7 fork_offset   '1' when the request named that position (compared on a re-PUT)
--       8 fork_sub      sub-offset inherited past fork_seq ('0' when none)
--       9 retention_ms  sliding retention of a stream with neither TTL nor expiry
--      10 maxlen        length cap of the log (approximate trimming)
--      11 id            a new random token naming this incarnation of the stream (ETags)
--      12 n             number of entries, then n pairs of (seq, data)
--
-- Returns {'created' | 'exists', last_seq, closed, content_type} | {'conflict'} |
-- {'deleted'} (a deleted stream that forks still hold: its name cannot be reused yet).
local meta, log, producers, forks = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function media(content_type)
  return (string.gsub(content_type, '%s*;.*$', ''))
end

local m = redis.call('HMGET', meta, 'content_type', 'ttl', 'expires_ms', 'closed', 'fork_of',
  'fork_seq', 'fork_sub', 'deleted', 'last_seq')
if m[1] then
  if m[8] then return {'deleted'} end
  local same = media(m[1]) == media(ARGV[1])
    and (m[2] or '') == ARGV[2]
    and (m[3] or '') == ARGV[3]
    and (m[4] or '') == ARGV[4]
    and (m[5] or '') == ARGV[5]
    and (ARGV[7] ~= '1' or (m[6] or '') == ARGV[6])
    and (m[7] or '0') == ARGV[8]
  if not same then return {'conflict'} end
  return {'exists', m[9], m[4] or '', m[1]}
end

-- Leftovers of an earlier stream of this name (its meta expired first) must not leak in.
redis.call('DEL', log, producers, forks)

local t = redis.call('TIME')
local last = ARGV[6] ~= '' and ARGV[6] or '0'
local n = tonumber(ARGV[12])
for i = 0, n - 1 do
  last = ARGV[13 + 2 * i]
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[10], last .. '-0', 'd', ARGV[14 + 2 * i])
end

local fields = {'content_type', ARGV[1], 'last_seq', last, 'id', ARGV[11],
  'created_ms', t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))}
if ARGV[2] ~= '' then fields[#fields + 1] = 'ttl'; fields[#fields + 1] = ARGV[2] end
if ARGV[3] ~= '' then fields[#fields + 1] = 'expires_ms'; fields[#fields + 1] = ARGV[3] end
if ARGV[4] == '1' then fields[#fields + 1] = 'closed'; fields[#fields + 1] = '1' end
if ARGV[5] ~= '' then
  for _, field in ipairs({'fork_of', ARGV[5], 'fork_seq', ARGV[6], 'fork_sub', ARGV[8]}) do
    fields[#fields + 1] = field
  end
end
redis.call('HSET', meta, unpack(fields))

for _, key in ipairs({meta, log}) do
  if ARGV[3] ~= '' then
    redis.call('PEXPIREAT', key, ARGV[3])
  elseif ARGV[2] ~= '' then
    redis.call('PEXPIRE', key, ARGV[2] .. '000')
  else
    redis.call('PEXPIRE', key, ARGV[9])
  end
end
return {'created', last, ARGV[4], ARGV[1]}
