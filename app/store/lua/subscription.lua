-- Shared by the subscription scripts (app/store/subscription_scripts.py), loaded after their
-- KEYS are bound: `meta` (configuration and the wake's state), `links` (path -> 'e'
-- explicit, 'g' by the pattern, or both), `acked` (path -> last seq processed, -1 before
-- the first), `tails` (path -> last seq heard of) and `snapshot` (path -> the tail shown to
-- the wake in flight). Times are Redis's clock, in epoch ms.
--
-- A wake is in flight while `wake_id` is set. A webhook's is delivered from `deliver_at`
-- (0: nothing to deliver) by the reader that took the attempt until `attempt_until`; its
-- lease runs to `lease_until` from each attempt. A pull-wake's event is delivered the
-- same way, and its lease starts when a worker claims it (`holder`).

local STATE = {'type', 'lease_ttl_ms', 'generation', 'wake_id', 'holder', 'lease_until',
  'deliver_at', 'attempt_until', 'retry_count', 'next_attempt', 'status', 'incarnation'}
local NUMBERS = {'lease_ttl_ms', 'generation', 'lease_until', 'deliver_at', 'attempt_until',
  'retry_count', 'next_attempt'}

local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(n)
  return string.format('%d', n)
end

-- The subscription's state, or nil when there is none.
local function load()
  local values = redis.call('HMGET', meta, unpack(STATE))
  if not values[1] then return nil end
  local s = {}
  for i, field in ipairs(STATE) do s[field] = values[i] or '' end
  for _, field in ipairs(NUMBERS) do s[field] = tonumber(s[field]) or 0 end
  return s
end

local function save(s)
  redis.call('HSET', meta, 'generation', int(s.generation), 'wake_id', s.wake_id,
    'holder', s.holder, 'lease_until', int(s.lease_until), 'deliver_at', int(s.deliver_at),
    'attempt_until', int(s.attempt_until), 'retry_count', int(s.retry_count),
    'next_attempt', int(s.next_attempt), 'status', s.status)
end

-- When the caller must look at the subscription again ('' for never): its lease's end, or
-- its delivery (once the attempt under way may have ended).
local function next_due(s)
  local due = s.lease_until
  if s.deliver_at > 0 then
    local at = math.max(s.deliver_at, s.attempt_until)
    if due == 0 or at < due then due = at end
  end
  return due > 0 and int(due) or ''
end

-- Link `path` (kind 'e' or 'g'); a new link starts with cursor `from` and tail `tail`.
local function link(path, kind, from, tail)
  local kinds = redis.call('HGET', links, path)
  if kinds then
    if not string.find(kinds, kind, 1, true) then
      redis.call('HSET', links, path, kinds .. kind)
    end
    return
  end
  redis.call('HSET', links, path, kind)
  redis.call('HSET', acked, path, from)
  redis.call('HSET', tails, path, tail)
end

local function unlink(path)
  redis.call('HDEL', links, path)
  redis.call('HDEL', acked, path)
  redis.call('HDEL', tails, path)
  redis.call('HDEL', snapshot, path)
end

-- Whether a linked stream has a tail past its cursor.
local function pending()
  local heard = redis.call('HGETALL', tails)
  for i = 1, #heard, 2 do
    if tonumber(heard[i + 1]) > tonumber(redis.call('HGET', acked, heard[i]) or '-1') then
      return true
    end
  end
  return false
end

-- The tails a worker is shown become the wake's snapshot: what `done` acks.
local function take_snapshot()
  redis.call('DEL', snapshot)
  local heard = redis.call('HGETALL', tails)
  for i = 1, #heard, 2 do redis.call('HSET', snapshot, heard[i], heard[i + 1]) end
end

local function end_wake(s)
  s.wake_id, s.holder = '', ''
  s.lease_until, s.deliver_at, s.attempt_until = 0, 0, 0
  redis.call('DEL', snapshot)
end

-- Whether `wake_id` of `generation` (as a caller holds them) is the wake in flight.
local function is_wake(s, wake_id, generation)
  return s.wake_id ~= '' and s.wake_id == wake_id and s.generation == tonumber(generation)
end

local function expire(s, now)
  if s.lease_until > 0 and s.lease_until <= now then end_wake(s) end
end

-- A new wake when the subscription is idle with pending work; whether one was issued. A
-- webhook's is delivered at once, or when its retry schedule allows; a pull-wake's event
-- at once, its lease starting when a worker claims it.
local function maybe_wake(s, now, wake_id)
  if s.wake_id ~= '' or s.holder ~= '' or not pending() then return false end
  s.generation = s.generation + 1
  s.wake_id = wake_id
  s.attempt_until = 0
  if s.type == 'webhook' then
    s.lease_until = now + s.lease_ttl_ms
    s.deliver_at = math.max(now, s.status == 'failed' and s.next_attempt or 0)
  else
    s.lease_until = 0
    s.deliver_at = now
  end
  return true
end

-- Each linked stream as path, kinds, cursor, tail (the snapshot's while a wake has one).
local function links_reply()
  local out = {}
  local all = redis.call('HGETALL', links)
  for i = 1, #all, 2 do
    local path = all[i]
    local tail = redis.call('HGET', snapshot, path) or redis.call('HGET', tails, path) or '0'
    out[#out + 1] = path
    out[#out + 1] = all[i + 1]
    out[#out + 1] = redis.call('HGET', acked, path) or '-1'
    out[#out + 1] = tail
  end
  return out
end

-- A wake as its deliverer or its claimer is given it: {code, next_due, generation, wake_id,
-- retry_count, config, callback_base, token_key, links}.
local function wake_reply(code, s)
  local config = redis.call('HMGET', meta, 'config', 'callback_base', 'token_key')
  return {code, next_due(s), int(s.generation), s.wake_id, int(s.retry_count), config[1],
    config[2], config[3], links_reply()}
end
