-- Create a Durable Stream, or answer whether an existing one matches the request (PUT
-- is idempotent). `content_type` is normalized: its media type (before ';') must match
-- an existing stream's; `fork_offset` says whether a re-PUT compares `fork_seq`.
--
-- Returns {'created' | 'exists', last_seq, closed, content_type} | {'conflict'} |
-- {'deleted'} (a deleted stream that forks still hold: its name cannot be reused yet).
local m = redis.call('HMGET', meta, 'content_type', 'ttl', 'expires_ms', 'closed', 'fork_of',
  'fork_seq', 'fork_sub', 'deleted', 'last_seq')
if m[1] then
  if m[8] then return {'deleted'} end
  local same = media_type(m[1]) == media_type(content_type)
    and (m[2] or '') == ttl_seconds
    and (m[3] or '') == expires_ms
    and (m[4] or '') == closed
    and (m[5] or '') == fork_of
    and (fork_offset ~= '1' or (m[6] or '') == fork_seq)
    and (m[7] or '0') == fork_sub
  if not same then return {'conflict'} end
  return {'exists', m[9], m[4] or '', m[1]}
end

-- Leftovers of an earlier stream of this name (its meta expired first) must not leak in.
redis.call('DEL', log, producers, forks)

local t = redis.call('TIME')
local last = fork_seq ~= '' and fork_seq or '0'
for i = 0, (#ARGV - entries_from + 1) / 2 - 1 do
  last = ARGV[entries_from + 2 * i]
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, last .. '-0', 'd', ARGV[entries_from + 2 * i + 1])
end

local fields = {'content_type', content_type, 'last_seq', last, 'id', stream_id,
  'created_ms', t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))}
if ttl_seconds ~= '' then fields[#fields + 1] = 'ttl'; fields[#fields + 1] = ttl_seconds end
if expires_ms ~= '' then fields[#fields + 1] = 'expires_ms'; fields[#fields + 1] = expires_ms end
if closed == '1' then fields[#fields + 1] = 'closed'; fields[#fields + 1] = '1' end
if fork_of ~= '' then
  for _, field in ipairs({'fork_of', fork_of, 'fork_seq', fork_seq, 'fork_sub', fork_sub}) do
    fields[#fields + 1] = field
  end
end
redis.call('HSET', meta, unpack(fields))

keep_stream({meta, log}, expires_ms ~= '' and expires_ms or nil,
  ttl_seconds ~= '' and ttl_seconds or nil, retention_ms)
return {'created', last, closed, content_type}
