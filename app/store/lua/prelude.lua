-- Shared by every script: loading prepends it (app/store/scripts.py), after the
-- TERMINAL set of statuses and before the lines that bind KEYS and ARGV to names.

-- Whether a generation with this status has its terminal event: nothing may follow it.
local function is_terminal(status)
  return TERMINAL[status] == true
end

-- A Durable Stream's content type without its parameters: appends match on it.
local function media_type(content_type)
  return (string.gsub(content_type, '%s*;.*$', ''))
end

-- A write slides a Durable Stream's lifetime: to its absolute expiry (epoch ms) if it
-- has one, else its own TTL (seconds), else the service's retention (ms).
local function keep_stream(keys, expires_ms, ttl_seconds, retention_ms)
  for _, key in ipairs(keys) do
    if expires_ms then
      redis.call('PEXPIREAT', key, expires_ms)
    elseif ttl_seconds then
      redis.call('PEXPIRE', key, ttl_seconds .. '000')
    else
      redis.call('PEXPIRE', key, retention_ms)
    end
  end
end
