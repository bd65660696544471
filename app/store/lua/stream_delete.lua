-- Delete a Durable Stream; one that forks still hold becomes a tombstone (410) until they
-- are gone. Live readers hear of it on `channel`, by PUBLISH (SPUBLISH on a cluster), and
-- end their responses. With `purge` '1' it only collects a tombstone no fork holds any more.
--
-- Returns {'removed', fork_of} (its keys are gone; fork_of: the stream it forked, '' if
-- none) | {'tombstone'} | {'missing'} | {'deleted'} (a tombstone already) | {'kept'}
-- (a purge of a stream that is not a free tombstone).
local m = redis.call('HMGET', meta, 'content_type', 'deleted', 'fork_of')
if not m[1] then return {'missing'} end
local held = redis.call('SCARD', forks) > 0
if purge == '1' then
  if not m[2] or held then return {'kept'} end
elseif m[2] then
  return {'deleted'}
elseif held then
  -- Forks keep copies of what they inherited: the tombstone keeps only the name taken.
  redis.call('HSET', meta, 'deleted', '1')
  redis.call('DEL', log, producers)
  redis.call(PUBLISH, channel, 'deleted')
  return {'tombstone'}
end
redis.call('DEL', meta, log, producers, forks)
redis.call(PUBLISH, channel, 'deleted')
return {'removed', m[3] or ''}
