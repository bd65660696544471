-- Create a generation, index it and (optionally) enqueue its job: all or nothing, once.
--
-- Besides the generation's own keys it writes the global indexes and the job
-- queue, as the MULTI it replaced did: on Redis Cluster it would have to be split.
-- Returns 1, or 0 when the generation exists: a create run twice (a retry after a
-- lost reply) must not reset a generation a worker may already hold.
if redis.call('EXISTS', meta) == 1 then return 0 end
redis.call('HSET', meta, 'status', 'queued', 'model', model, 'last_seq', 0,
  'created_ms', created_ms, 'epoch', 0, 'attempts', 0)
if owner ~= '' then redis.call('HSET', meta, 'owner', owner) end
redis.call('PEXPIRE', meta, open_ttl_ms)
redis.call('SET', request, request_json, 'PX', open_ttl_ms)
redis.call('ZADD', open, created_ms, generation_id)
-- The index behind `tokentape ls`, trimmed to what metadata retention keeps.
redis.call('ZADD', recent, created_ms, generation_id)
redis.call('ZREMRANGEBYSCORE', recent, '-inf', tonumber(created_ms) - tonumber(meta_ttl_ms))
if #ARGV >= job_from then redis.call('XADD', jobs, '*', unpack(ARGV, job_from)) end
return 1
