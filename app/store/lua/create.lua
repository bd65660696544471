-- Create a generation: its metadata and request, once. Its shard's indexes and job
-- queue are written by index.lua (on a cluster, in another slot) once this created it.
--
-- Returns 1, or 0 when the generation exists: a create run twice (a retry after a
-- lost reply) must not reset a generation a worker may already hold.
if redis.call('EXISTS', meta) == 1 then return 0 end
redis.call('HSET', meta, 'status', 'queued', 'model', model, 'last_seq', 0,
  'created_ms', created_ms, 'epoch', 0, 'attempts', 0)
if owner ~= '' then redis.call('HSET', meta, 'owner', owner) end
redis.call('PEXPIRE', meta, open_ttl_ms)
redis.call('SET', request, request_json, 'PX', open_ttl_ms)
return 1
