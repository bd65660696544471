-- Record a new fork on its source, so that deleting the source leaves a tombstone.
--
-- KEYS: meta, forks of the source (under the source's hash tag)
-- ARGV: 1 fork   the fork's stream name
--
-- Returns 'ok' | 'missing' | 'deleted'.
local meta, forks = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'content_type', 'deleted')
if not m[1] then return 'missing' end
if m[2] then return 'deleted' end
redis.call('SADD', forks, ARGV[1])
-- The set lives as long as its stream (a set created now has no TTL yet).
local ttl = redis.call('PTTL', meta)
if ttl > 0 then redis.call('PEXPIRE', forks, ttl) end
return 'ok'
