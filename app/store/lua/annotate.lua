-- Set one field of a generation's metadata, unless it is gone (never re-create an
-- expired hash: it would have no TTL). Returns 1 when set.
if redis.call('EXISTS', meta) == 1 then
  redis.call('HSET', meta, field, value)
  return 1
end
return 0
