-- Delete a stream; one that forks still hold becomes a tombstone (410) until they are gone.
--
-- KEYS: meta, log, producers, forks (all under the stream's hash tag)
-- ARGV: 1 channel   pub/sub channel of live readers (they end their responses)
--       2 purge     '1': delete only a tombstone no fork holds any more (garbage collection)
--
-- Returns {'deleted', fork_of} | {'tombstone'} | {'missing'} | {'already_deleted'} |
-- {'kept'} (purge of a stream that is not a free tombstone).
local meta, log, producers, forks = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local m = redis.call('HMGET', meta, 'content_type', 'deleted', 'fork_of')
if not m[1] then return {'missing'} end
local held = redis.call('SCARD', forks) > 0
if ARGV[2] == '1' then
  if not m[2] or held then return {'kept'} end
elseif m[2] then
  return {'already_deleted'}
elseif held then
  -- Forks keep copies of what they inherited: the tombstone keeps only the name taken.
  redis.call('HSET', meta, 'deleted', '1')
  redis.call('DEL', log, producers)
  redis.call('PUBLISH', ARGV[1], 'deleted')
  return {'tombstone'}
end
redis.call('DEL', meta, log, producers, forks)
redis.call('PUBLISH', ARGV[1], 'deleted')
return {'deleted', m[3] or ''}
