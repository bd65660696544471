-- Read a page of a stream with its metadata, as one snapshot: a page that reaches the
-- tail of a closed stream says so, whatever is appended or closed meanwhile.
--
-- KEYS: meta, log, producers, forks (all under the stream's hash tag)
-- ARGV: 1 after       the last seq the reader has, or 'now' for the tail
--       2 from_start  '1' when reading from the start: a trimmed log starts at its first entry
--       3 count       at most this many entries
--       4 max_bytes   stop before the entry that would pass this many bytes (one at least)
--       5 until       the last seq to read ('' for the tail)
--       6 refresh     '1': a read slides the stream's TTL (HEAD and forking do not)
--
-- Returns {'ok', last_seq, closed, content_type, ttl, expires_ms, id, after, then pairs of
-- (seq, data)} | {'missing'} | {'deleted'} | {'beyond', last_seq} (an offset past the
-- tail) | {'gone', first_seq} (the entries after `after` were trimmed by the length cap).
local meta, log = KEYS[1], KEYS[2]

local m = redis.call('HMGET', meta, 'content_type', 'last_seq', 'closed', 'ttl', 'expires_ms',
  'id', 'deleted')
if not m[1] then return {'missing'} end
if m[7] then return {'deleted'} end
local last = tonumber(m[2])
local after = ARGV[1] == 'now' and last or tonumber(ARGV[1])
if after > last then return {'beyond', m[2]} end

local out = {'ok', m[2], m[3] or '', m[1], m[4] or '', m[5] or '', m[6],
  string.format('%d', after)}
local upper = ARGV[5] == '' and last or math.min(last, tonumber(ARGV[5]))
if after < upper then
  local rows = redis.call('XRANGE', log, string.format('%d-0', after + 1),
    string.format('%d-0', upper), 'COUNT', ARGV[3])
  -- The meta outlives its log by the moment between their expiries: the stream is gone.
  if #rows == 0 then return {'missing'} end
  local first = string.match(rows[1][1], '^(%d+)')
  if tonumber(first) ~= after + 1 and ARGV[2] ~= '1' then return {'gone', first} end
  local budget = tonumber(ARGV[4])
  for i, row in ipairs(rows) do
    local data = row[2][2]
    if i > 1 and #data > budget then break end
    budget = budget - #data
    out[#out + 1] = string.match(row[1], '^(%d+)')
    out[#out + 1] = data
  end
end

if ARGV[6] == '1' and m[4] then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, m[4] .. '000') end
end
return out
