-- Create a subscription, or answer whether an existing one has this configuration (PUT is
-- idempotent: compared by `config_hash`). `links` are triples (path, kind, tail): each
-- stream linked with its cursor at its tail, so a new subscription does not replay what was
-- written before it.
--
-- Returns {'created'} | {'exists'} | {'conflict'}.
local existing = redis.call('HGET', meta, 'config_hash')
if existing then return {existing == config_hash and 'exists' or 'conflict'} end
redis.call('DEL', links, acked, tails, snapshot)
redis.call('HSET', meta, 'config', config, 'config_hash', config_hash, 'type', subscription_type,
  'lease_ttl_ms', lease_ttl_ms, 'callback_base', callback_base, 'token_key', token_key,
  'incarnation', incarnation, 'created_ms', int(clock_ms()))
save({generation = 0, wake_id = '', holder = '', lease_until = 0, deliver_at = 0,
  attempt_until = 0, retry_count = 0, next_attempt = 0, status = 'active'})
for n = 0, (#ARGV - links_from + 1) / 3 - 1 do
  link(ARGV[links_from + 3 * n], ARGV[links_from + 3 * n + 1], ARGV[links_from + 3 * n + 2],
    ARGV[links_from + 3 * n + 2])
end
return {'created'}
