-- Read a page of a Durable Stream with its metadata, as one snapshot: a page that reaches
-- the tail of a closed stream says so, whatever is appended or closed meanwhile.
-- `after` is the last seq the reader has, or 'now' for the tail; `from_start` '1' reads
-- from the first entry kept (a trimmed log is no error then). A page holds at most
-- `max_entries`, stops before the entry that would pass `max_bytes` (one at least) and
-- at `through` ('' for the tail). With `refresh` '1' a read slides the stream's TTL
-- (HEAD and forking do not).
--
-- Returns {'ok', last_seq, closed, content_type, ttl, expires_ms, id, after, then pairs
-- of (seq, data)} | {'missing'} | {'deleted'} | {'beyond', last_seq} (an offset past the
-- tail) | {'trimmed', first_seq} (the entries after `after` were trimmed by the length cap).
local m = redis.call('HMGET', meta, 'content_type', 'last_seq', 'closed', 'ttl', 'expires_ms',
  'id', 'deleted')
if not m[1] then return {'missing'} end
if m[7] then return {'deleted'} end
local last = tonumber(m[2])
local position = after == 'now' and last or tonumber(after)
if position > last then return {'beyond', m[2]} end

local out = {'ok', m[2], m[3] or '', m[1], m[4] or '', m[5] or '', m[6],
  string.format('%d', position)}
local upper = through == '' and last or math.min(last, tonumber(through))
if position < upper then
  local rows = redis.call('XRANGE', log, string.format('%d-0', position + 1),
    string.format('%d-0', upper), 'COUNT', max_entries)
  -- The meta outlives its log by the moment between their expiries: the stream is gone.
  if #rows == 0 then return {'missing'} end
  local first = string.match(rows[1][1], '^(%d+)')
  if tonumber(first) ~= position + 1 and from_start ~= '1' then return {'trimmed', first} end
  local budget = tonumber(max_bytes)
  for i, row in ipairs(rows) do
    local data = row[2][2]
    if i > 1 and #data > budget then break end
    budget = budget - #data
    out[#out + 1] = string.match(row[1], '^(%d+)')
    out[#out + 1] = data
  end
end

if refresh == '1' and m[4] then
  for _, key in ipairs({meta, log, producers, forks}) do
    redis.call('PEXPIRE', key, m[4] .. '000')
  end
end
return out
