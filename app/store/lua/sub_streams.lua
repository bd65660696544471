-- Add explicit streams (`op` 'add'; `streams` are pairs (path, tail), each linked with its
-- cursor at its tail) or take one's explicit link away (`op` 'remove'; `streams` is its
-- path: a link the pattern also made stays).
--
-- Returns {'ok', explicit path, ...} | {'missing'}.
if redis.call('EXISTS', meta) == 0 then return {'missing'} end
if op == 'add' then
  for n = 0, (#ARGV - streams_from + 1) / 2 - 1 do
    local path, tail = ARGV[streams_from + 2 * n], ARGV[streams_from + 2 * n + 1]
    link(path, 'e', tail, tail)
  end
else
  local path = ARGV[streams_from]
  local kinds = redis.call('HGET', links, path)
  if kinds then
    local left = string.gsub(kinds, 'e', '')
    if left == '' then unlink(path) else redis.call('HSET', links, path, left) end
  end
end
local explicit = {'ok'}
local all = redis.call('HGETALL', links)
for i = 1, #all, 2 do
  if string.find(all[i + 1], 'e', 1, true) then explicit[#explicit + 1] = all[i] end
end
return explicit
