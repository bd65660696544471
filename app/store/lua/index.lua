-- Index a created generation in its shard and (optionally) queue its job, all or nothing.
-- Returns 1.
redis.call('ZADD', open, created_ms, generation_id)
-- The index behind `tokentape ls`, trimmed to what metadata retention keeps.
redis.call('ZADD', recent, created_ms, generation_id)
redis.call('ZREMRANGEBYSCORE', recent, '-inf', tonumber(created_ms) - tonumber(meta_ttl_ms))
if #ARGV >= job_from then redis.call('XADD', jobs, '*', unpack(ARGV, job_from)) end
return 1
