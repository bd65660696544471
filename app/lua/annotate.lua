-- Set one field of a generation's metadata, unless it is gone (never re-create an
-- expired hash: it would have no TTL).
-- KEYS: meta. ARGV: field, value. Returns 1 when set.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
