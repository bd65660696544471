-- Create a generation, index it and (optionally) enqueue its job: all or nothing, once.
--
-- KEYS: meta, request, open, recent, jobs. Besides the generation's own keys it
-- writes the global indexes and the job queue, as the MULTI it replaced did: on
-- Redis Cluster it would have to be split.
-- ARGV: 1 generation id, 2 model, 3 request JSON, 4 created ms, 5 open ttl ms,
--       6 metadata retention ms (trims the recent index), 7.. the job's stream entry
--       as field, value, ... (`app.jobs.entry_fields`); none = no job
-- Returns 1, or 0 when the generation exists: a create run twice (a retry after a
-- lost reply) must not reset a generation a worker may already hold.
local meta, request, open, recent, jobs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, created, ttl = ARGV[1], ARGV[4], ARGV[5]
if redis.call('EXISTS', meta) == 1 then return 0 end
redis.call('HSET', meta, 'status', 'queued', 'model', ARGV[2], 'last_seq', 0,
  'created_ms', created, 'epoch', 0, 'attempts', 0)
redis.call('PEXPIRE', meta, ttl)
redis.call('SET', request, ARGV[3], 'PX', ttl)
redis.call('ZADD', open, created, id)
-- The index behind `tokentape ls`, trimmed to what metadata retention keeps.
redis.call('ZADD', recent, created, id)
redis.call('ZREMRANGEBYSCORE', recent, '-inf', tonumber(created) - tonumber(ARGV[6]))
if #ARGV > 6 then redis.call('XADD', jobs, '*', unpack(ARGV, 7)) end
return 1
