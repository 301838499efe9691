"""The Lua scripts behind every update that touches more than one key.

Each script runs atomically in Redis, which is what makes the cluster-wide guarantees hold:
two gateways racing for one name cannot both win, a leave is announced exactly once however
many gateways try to reap the same dead peer, and a room event's stream id is its delivery
order (it is appended to the stream and published in one step).

Calling convention, shared by all scripts so that the prelude can name things:

* ``KEYS = [stream, channel, online, gateways, activity, ...]``
* ``ARGV = [stream maxlen, gateway key prefix, alive suffix, users suffix, ...]``

Per-gateway keys are built inside the scripts from that prefix and those suffixes, which
:mod:`broker.keys` supplies; the scripts spell no key names of their own.
"""

from __future__ import annotations

PRELUDE = """
local STREAM, CHANNEL, ONLINE, GATEWAYS, ACTIVITY = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local MAXLEN, GW_PREFIX, ALIVE_SUFFIX, USERS_SUFFIX = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function alive_key(gid) return GW_PREFIX .. gid .. ALIVE_SUFFIX end
local function users_key(gid) return GW_PREFIX .. gid .. USERS_SUFFIX end

-- Append an event to the room stream and publish it with its id: one order for both.
local function emit(data)
  local id = redis.call('XADD', STREAM, 'MAXLEN', '~', MAXLEN, '*', 'd', data)
  redis.call('PUBLISH', CHANNEL, id .. ' ' .. data)
  return id
end

local function emit_leave(p)
  return emit(cjson.encode({kind='leave', name=p.name, gateway=p.gateway, session=p.session}))
end

-- Remove every user a gateway holds, announcing each leave once. Returns how many.
local function evict(gid)
  local n = 0
  for _, key in ipairs(redis.call('SMEMBERS', users_key(gid))) do
    local rec = redis.call('HGET', ONLINE, key)
    if rec then
      local p = cjson.decode(rec)
      if p.gateway == gid then
        redis.call('HDEL', ONLINE, key)
        redis.call('HDEL', ACTIVITY, key)
        emit_leave(p)
        n = n + 1
      end
    end
  end
  redis.call('DEL', users_key(gid))
  return n
end

-- The gateway record's instance token, or false.
local function registered_instance(gid)
  local rec = redis.call('HGET', GATEWAYS, gid)
  if not rec then return false end
  return cjson.decode(rec).instance
end
"""

# ARGV[5..]: JSON bodies of chat messages. Returns their stream ids, in order.
PUBLISH = """
local ids = {}
for i = 5, #ARGV do ids[#ids + 1] = emit(ARGV[i]) end
return ids
"""

# ARGV[5..11]: name key, display name, gateway id, session id, since (ms), instance,
# announce ("1": emit the join event; "0": a silent restore after Redis lost its data).
# Returns {1, online, join event id or ""} | {0} when taken | {-1} when the gateway is not
# live.
CLAIM = """
local key, name, gid, session, since, instance, announce =
  ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
if redis.call('GET', alive_key(gid)) ~= instance then return {-1} end
local held = redis.call('HGET', ONLINE, key)
if held then
  -- Already ours (a restore racing a fresh login of the same session) is a success.
  if cjson.decode(held).session == session then
    return {1, redis.call('HLEN', ONLINE), ''}
  end
  return {0}
end
redis.call('HSET', ONLINE, key, cjson.encode(
  {name=name, gateway=gid, session=session, since_ms=tonumber(since)}))
redis.call('SADD', users_key(gid), key)
redis.call('HDEL', ACTIVITY, key)
local online = redis.call('HLEN', ONLINE)
if announce ~= '1' then return {1, online, ''} end
local id = emit(cjson.encode(
  {kind='join', name=name, gateway=gid, session=session, online=online}))
return {1, online, id}
"""

# ARGV[5..7]: name key, session id, gateway id. Returns 1 if this session held the name
# (leave announced); 0 if it did not (already released or reaped: nothing to announce);
# -1 if nobody holds it and the gateway is not registered either: Redis may have lost its
# data, and only the gateway, once registered again, can tell whether a leave is owed.
RELEASE = """
local key, session, gid = ARGV[5], ARGV[6], ARGV[7]
local rec = redis.call('HGET', ONLINE, key)
if not rec then
  if redis.call('HEXISTS', GATEWAYS, gid) == 0 then return -1 end
  return 0
end
local p = cjson.decode(rec)
if p.session ~= session then return 0 end
redis.call('HDEL', ONLINE, key)
redis.call('HDEL', ACTIVITY, key)
redis.call('SREM', users_key(p.gateway), key)
emit_leave(p)
return 1
"""

# KEYS[6]: the session's "left" mark. ARGV[5..9]: name key, session id, display name,
# gateway id, mark TTL (ms). The leave of a user whose presence Redis lost with its data:
# announced unless the name is held again by another session (the user is back) or this
# session's leave was announced already (a retry after a lost reply). Returns 1 if
# announced.
FORCE_LEAVE = """
local key, session, name, gid, ttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local rec = redis.call('HGET', ONLINE, key)
local p = rec and cjson.decode(rec)
if p and p.session ~= session then return 0 end
if not redis.call('SET', KEYS[6], '1', 'NX', 'PX', ttl) then return 0 end
if p then
  redis.call('HDEL', ONLINE, key)
  redis.call('HDEL', ACTIVITY, key)
  redis.call('SREM', users_key(p.gateway), key)
end
emit_leave({name=name, gateway=gid, session=session})
return 1
"""

# ARGV[5..8]: gateway id, instance, gateway record JSON, liveness TTL (ms).
# Returns {1, users evicted from an earlier run under this id} | {0, 0} if the id is live
# under another instance.
REGISTER = """
local gid, instance, record, ttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local current = redis.call('GET', alive_key(gid))
if current and current ~= instance then return {0, 0} end
local evicted = 0
if not current then evicted = evict(gid) end
redis.call('SET', alive_key(gid), instance, 'PX', ttl)
redis.call('HSET', GATEWAYS, gid, record)
return {1, evicted}
"""

# ARGV[5..7]: gateway id, instance, liveness TTL (ms).
# Returns 1 renewed | 0 registration lost (reaped, or Redis lost its data) | -1 the id now
# belongs to another instance.
HEARTBEAT = """
local gid, instance, ttl = ARGV[5], ARGV[6], ARGV[7]
local current = redis.call('GET', alive_key(gid))
if current == instance or (not current and registered_instance(gid) == instance) then
  redis.call('SET', alive_key(gid), instance, 'PX', ttl)
  return 1
end
if current then return -1 end
return 0
"""

# Reaps every registered gateway whose liveness key has expired: its users' leaves are
# announced and it is forgotten. Returns {gid, users evicted, gid, users evicted, ...}.
REAP = """
local reaped = {}
for _, gid in ipairs(redis.call('HKEYS', GATEWAYS)) do
  if redis.call('EXISTS', alive_key(gid)) == 0 then
    local n = evict(gid)
    redis.call('HDEL', GATEWAYS, gid)
    reaped[#reaped + 1] = gid
    reaped[#reaped + 1] = n
  end
end
return reaped
"""

# ARGV[5..6]: gateway id, instance. A clean stop: every user's leave is announced and the
# gateway forgotten. Returns the number of users evicted, or -1 if the id is not ours.
DEREGISTER = """
local gid, instance = ARGV[5], ARGV[6]
local current = redis.call('GET', alive_key(gid))
if current and current ~= instance then return -1 end
local n = evict(gid)
redis.call('DEL', alive_key(gid))
if registered_instance(gid) == instance then redis.call('HDEL', GATEWAYS, gid) end
return n
"""

# ARGV[5..6]: name key, reason. Asks the gateway holding the name to disconnect it.
# Returns {1, name, session, gateway} | {0} if nobody holds the name.
KICK = """
local key, reason = ARGV[5], ARGV[6]
local rec = redis.call('HGET', ONLINE, key)
if not rec then return {0} end
local p = cjson.decode(rec)
emit(cjson.encode({kind='kick', name=p.name, gateway=p.gateway, session=p.session,
                   reason=reason}))
return {1, p.name, p.session, p.gateway}
"""

# ARGV[5..]: name key, ms, name key, ms, ... Last activity of users still online.
TOUCH = """
for i = 5, #ARGV, 2 do
  if redis.call('HEXISTS', ONLINE, ARGV[i]) == 1 then
    redis.call('HSET', ACTIVITY, ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# ARGV[5..8]: gateway id, instance, gateway record JSON, liveness TTL (ms); then groups of
# five: name key, display name, session id, since (ms), announce ("1" or "0").
# A gateway whose registration was lost (reaped, or Redis lost its data) registers again
# and restores its users in one step, so that no release can slip in between and find a
# user neither gone nor restored. Returns the name keys held meanwhile by other sessions,
# or {-1} if another instance holds the gateway id.
RESTORE = """
local gid, instance, record, ttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local current = redis.call('GET', alive_key(gid))
if current and current ~= instance then return {-1} end
redis.call('SET', alive_key(gid), instance, 'PX', ttl)
redis.call('HSET', GATEWAYS, gid, record)
local refused = {}
for i = 9, #ARGV, 5 do
  local key, name, session, since, announce =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local held = redis.call('HGET', ONLINE, key)
  if held then
    if cjson.decode(held).session ~= session then refused[#refused + 1] = key end
  else
    redis.call('HSET', ONLINE, key, cjson.encode(
      {name=name, gateway=gid, session=session, since_ms=tonumber(since)}))
    redis.call('SADD', users_key(gid), key)
    if announce == '1' then
      emit(cjson.encode({kind='join', name=name, gateway=gid, session=session,
                         online=redis.call('HLEN', ONLINE)}))
    end
  end
end
return refused
"""
