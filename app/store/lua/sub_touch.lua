-- Streams were written to (or found gone): update what the subscription knows of them, and
-- issue a wake if it is idle with pending work. `writes` are triples (path, tail, how): how
-- is 'g' when the subscription's pattern matches the path (an unlinked stream is linked, its
-- cursor before its first append), '' for a linked stream only, 'gone' for a stream that no
-- longer exists (a pattern's link goes; an explicit one waits for the stream at 0).
--
-- Returns {'woken' | 'quiet', next_due} | {'missing'}.
local s = load()
if not s then return {'missing'} end
local now = clock_ms()
for n = 0, (#ARGV - writes_from + 1) / 3 - 1 do
  local path, tail, how = ARGV[writes_from + 3 * n], ARGV[writes_from + 3 * n + 1],
    ARGV[writes_from + 3 * n + 2]
  local kinds = redis.call('HGET', links, path)
  if how == 'gone' then
    if kinds and string.find(kinds, 'e', 1, true) then
      redis.call('HSET', links, path, 'e')
      redis.call('HSET', acked, path, '0')
      redis.call('HSET', tails, path, '0')
    elseif kinds then
      unlink(path)
    end
  elseif kinds then
    if tonumber(tail) > tonumber(redis.call('HGET', tails, path) or '0') then
      redis.call('HSET', tails, path, tail)
    end
  elseif how == 'g' then
    link(path, 'g', '-1', tail)
  end
end
expire(s, now)
local woken = maybe_wake(s, now, new_wake_id)
save(s)
return {woken and 'woken' or 'quiet', next_due(s)}
