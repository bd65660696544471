-- Record a new fork on its source, so that deleting the source leaves a tombstone.
-- `meta` and `forks` are the source's.
--
-- Returns {'ok'} | {'missing'} | {'deleted'}.
local m = redis.call('HMGET', meta, 'content_type', 'deleted')
if not m[1] then return {'missing'} end
if m[2] then return {'deleted'} end
redis.call('SADD', forks, fork)
-- The set lives as long as its stream (a set created now has no TTL yet).
local ttl = redis.call('PTTL', meta)
if ttl > 0 then redis.call('PEXPIRE', forks, ttl) end
return {'ok'}
