-- Admit one creation by an API key, or say which of its limits refuses it.
--
-- Touches only the keys of one owner (one hash tag): `running`, its generations not yet
-- seen to end, and `created`, its creations of the last minute, both sorted sets scored
-- by Redis's clock in ms. Atomic, so no burst from any number of readers gets past a
-- limit. Whether a generation in `running` ended is the caller's to find out (its keys
-- live in other slots): 'running' hands it the members to look at.
--
-- Returns {'ok'} | {'rate', ms until a creation is allowed again} |
-- {'running', now_ms, id, score, id, score, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
local per_minute = tonumber(max_per_minute)
local most_running = tonumber(max_running)

if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', created, '-inf', string.format('%d', now - 60000))
  if redis.call('ZCARD', created) >= per_minute then
    local oldest = redis.call('ZRANGE', created, 0, 0, 'WITHSCORES')
    return {'rate', tonumber(oldest[2]) + 60000 - now}
  end
end
if most_running > 0 then
  if redis.call('ZCARD', running) >= most_running then
    local reply = {'running', now_s}
    for _, value in ipairs(redis.call('ZRANGE', running, 0, -1, 'WITHSCORES')) do
      reply[#reply + 1] = value
    end
    return reply
  end
  redis.call('ZADD', running, now_s, generation_id)
  redis.call('PEXPIRE', running, running_ttl_ms)
end
if per_minute > 0 then
  redis.call('ZADD', created, now_s, generation_id)
  redis.call('PEXPIRE', created, 60000)
end
return {'ok'}
