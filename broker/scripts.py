"""The Lua scripts behind every update that touches more than one key.

Each script runs atomically in Redis, which is what makes the cluster-wide guarantees hold:
two gateways racing for one name cannot both win, a join or leave is announced exactly once
however many gateways try (the member is added or removed in the same step, and only the
step that changes it announces), and a room event's stream id is its delivery order (it is
appended to the stream and published in one step).

Every script touches the keys of one Redis Cluster slot: the **global** scripts the
``{chat}`` keys, the **room** scripts one room's keys. Events arrive already encoded
(:mod:`broker.events`); the scripts never build one.

Calling conventions, shared so that the preludes can name things:

* global: ``KEYS = [online, gateways, activity, reaping, pulse, grace]``,
  ``ARGV = [gateway key prefix, alive suffix, users suffix, inbox suffix, ...]``; per-gateway
  keys are built from that prefix and those suffixes (:mod:`broker.keys` supplies them);
* room: ``KEYS = [stream, channel, members, name, said, ...]``,
  ``ARGV = [stream maxlen, said maxlen, "1" if the room is permanent else "0", ...]``.

Events go out by pub/sub, through the command named ``PUBLISH`` in Lua: ``PUBLISH`` on one
Redis server, ``SPUBLISH`` on a Redis Cluster, where sharded pub/sub keeps each room's
traffic on the node that owns its slot (:func:`sources`).
"""

from __future__ import annotations

GLOBAL_PRELUDE = """
local ONLINE, GATEWAYS, ACTIVITY, REAPING = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local PULSE, GRACE = KEYS[5], KEYS[6]
local GW_PREFIX, ALIVE_SUFFIX, USERS_SUFFIX, INBOX_SUFFIX = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function alive_key(gid) return GW_PREFIX .. gid .. ALIVE_SUFFIX end
local function users_key(gid) return GW_PREFIX .. gid .. USERS_SUFFIX end
local function inbox(gid) return GW_PREFIX .. gid .. INBOX_SUFFIX end

-- The gateway record's instance token, or false.
local function registered_instance(gid)
  local rec = redis.call('HGET', GATEWAYS, gid)
  if not rec then return false end
  return cjson.decode(rec).instance
end

-- A gateway reached Redis: beat the service's pulse (see HEARTBEAT). If it had stopped
-- (no gateway got through for half a TTL) while gateways are registered, open a grace of
-- one TTL in which nobody is reaped.
local function beat_pulse(ttl)
  if redis.call('EXISTS', PULSE) == 0 and redis.call('HLEN', GATEWAYS) > 0 then
    redis.call('SET', GRACE, '1', 'PX', ttl)
  end
  redis.call('SET', PULSE, '1', 'PX', math.max(1, math.floor(ttl / 2)))
end

local function presence(name, gid, session, since, room)
  return cjson.encode({name=name, gateway=gid, session=session, since_ms=tonumber(since),
                       room=room, prev=''})
end
"""

ROOM_PRELUDE = """
local STREAM, CHANNEL, MEMBERS, NAME, SAID = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local MAXLEN, SAID_MAXLEN, PERMANENT = ARGV[1], ARGV[2], ARGV[3] == '1'

-- Append an event to the room stream; returns its id.
local function append(data)
  return redis.call('XADD', STREAM, 'MAXLEN', '~', MAXLEN, '*', 'd', data)
end

-- Append an event to the room stream and publish it with its id: one order for both.
local function emit(data)
  local id = append(data)
  redis.call(PUBLISH, CHANNEL, id .. ' ' .. data)
  return id
end

-- A room is gone with its last member (the default room stays).
local function vacate()
  if not PERMANENT and redis.call('EXISTS', MEMBERS) == 0 then
    redis.call('DEL', STREAM, NAME, SAID)
  end
end
"""

# --- room scripts ---------------------------------------------------------------------------

# ARGV[4]: "1" if the events are chat messages, which are also kept, under the same ids,
# in the stream of what was said (history reads it, never walking past joins and leaves);
# several go on the bus as one run (see broker.events). ARGV[5..]: encoded events.
# Returns their stream ids, in order; none if the room has no members any more (a room
# other than the default one is gone then, and stays gone).
PUBLISH = """
if not PERMANENT and redis.call('EXISTS', MEMBERS) == 0 then return {} end
local said = ARGV[4] == '1'
local ids = {}
local run = said and #ARGV > 5
for i = 5, #ARGV do  -- lines as gateways write them: no line break in them
  if string.sub(ARGV[i], 1, 2) ~= 'm ' or string.find(ARGV[i], '\\n', 1, true) then
    run = false
  end
end
-- A run of chat messages: each its own entry in both streams, one bus message for all
-- (ids comma-separated, then the lines), so that no gateway works per message. Anything
-- else goes on the bus event by event.
local lines = {}
for i = 5, #ARGV do
  local id
  if run then
    id = append(ARGV[i])
    lines[#lines + 1] = string.sub(ARGV[i], 3)
  else
    id = emit(ARGV[i])
  end
  if said then redis.call('XADD', SAID, 'MAXLEN', '~', SAID_MAXLEN, id, 'd', ARGV[i]) end
  ids[#ids + 1] = id
end
if run then
  redis.call(PUBLISH, CHANNEL, table.concat(ids, ',') .. ' m ' .. table.concat(lines, '\\n'))
end
return ids
"""

# ARGV[4]: the room's name as typed, kept if the room is new; then triples: session, member
# record, join event ("": enter silently). Each session not yet a member is added and its
# join announced. Returns {members, the room's name, then per triple the join's stream id
# or "" (already a member, or silent)}.
ENTER = """
redis.call('SET', NAME, ARGV[4], 'NX')
local ids = {}
for i = 5, #ARGV, 3 do
  local id = ''
  if redis.call('HSETNX', MEMBERS, ARGV[i], ARGV[i + 1]) == 1 and ARGV[i + 2] ~= '' then
    id = emit(ARGV[i + 2])
  end
  ids[#ids + 1] = id
end
local result = {redis.call('HLEN', MEMBERS), redis.call('GET', NAME)}
for _, id in ipairs(ids) do result[#result + 1] = id end
return result
"""

# ARGV[4..]: pairs of session, leave event. Each session still a member is removed and its
# leave announced. Returns, per pair, the leave's stream id or "" (not a member: already
# gone, so nothing to announce).
LEAVE = """
local ids = {}
for i = 4, #ARGV, 2 do
  local id = ''
  if redis.call('HDEL', MEMBERS, ARGV[i]) == 1 then id = emit(ARGV[i + 1]) end
  ids[#ids + 1] = id
end
vacate()
return ids
"""

# KEYS[6]: the session's "left" mark. ARGV[4..6]: session, leave event, mark TTL (ms).
# The leave of a user whose membership Redis lost with its data: announced unless this
# session's leave was announced already (a retry after a lost reply). Returns 1 if
# announced.
FORCE_LEAVE = """
local session, event, ttl = ARGV[4], ARGV[5], ARGV[6]
if not redis.call('SET', KEYS[6], '1', 'NX', 'PX', ttl) then return 0 end
redis.call('HDEL', MEMBERS, session)
emit(event)
vacate()
return 1
"""

# --- global scripts -------------------------------------------------------------------------

# ARGV[5..11]: name key, display name, gateway id, session id, since (ms), instance, room.
# Returns {1, users online} | {0} when taken | {-1} when the gateway is not live.
CLAIM = """
local key, name, gid, session, since, instance, room =
  ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
if redis.call('GET', alive_key(gid)) ~= instance then return {-1} end
local held = redis.call('HGET', ONLINE, key)
if held then
  -- Already ours (a retry whose first reply was lost) is a success.
  if cjson.decode(held).session == session then return {1, redis.call('HLEN', ONLINE)} end
  return {0}
end
redis.call('HSET', ONLINE, key, presence(name, gid, session, since, room))
redis.call('SADD', users_key(gid), key)
redis.call('HDEL', ACTIVITY, key)
return {1, redis.call('HLEN', ONLINE)}
"""

# ARGV[5..7]: name key, session id, room key. Records that the session is moving to that
# room (the room it was in stays as `prev` until the next move, so that whoever evicts the
# user looks in both). Returns 1, or 0 if the session does not hold the name.
SET_ROOM = """
local key, session, room = ARGV[5], ARGV[6], ARGV[7]
local rec = redis.call('HGET', ONLINE, key)
if not rec then return 0 end
local p = cjson.decode(rec)
if p.session ~= session then return 0 end
if p.room ~= room then p.prev, p.room = p.room, room end
redis.call('HSET', ONLINE, key, cjson.encode(p))
return 1
"""

# ARGV[5..7]: name key, session id, gateway id. Frees the name if this session holds it.
# Returns 1 freed; 0 not held by this session (already released or reaped); -1 nobody holds
# it and the gateway is not registered either: Redis may have lost its data, and only the
# gateway, once registered again, can tell whether a leave is owed.
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
return 1
"""

# ARGV[5..8]: gateway id, instance, gateway record JSON, liveness TTL (ms).
# Returns {1, users left over from an earlier run under this id (still to evict)} | {0, 0}
# if the id is live under another instance. A registered id leaves the reaping queue: its
# new run evicts what the old one left, and reapers spare the new run's sessions.
REGISTER = """
local gid, instance, record, ttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local current = redis.call('GET', alive_key(gid))
if current and current ~= instance then return {0, 0} end
beat_pulse(ttl)
redis.call('SET', alive_key(gid), instance, 'PX', ttl)
redis.call('HSET', GATEWAYS, gid, record)
redis.call('SREM', REAPING, gid)
return {1, redis.call('SCARD', users_key(gid))}
"""

# ARGV[5..7]: gateway id, instance, liveness TTL (ms).
# Returns 1 renewed | 0 registration lost (reaped, or Redis lost its data) | -1 the id now
# belongs to another instance.
#
# Every renewal (and registration) also beats the service's pulse. One that finds the
# pulse gone (no gateway got through for half a TTL: Redis was unreachable, frozen or
# failing over) while gateways are registered opens a grace of one TTL in which nobody
# is reaped: an outage lets every gateway's key lapse, and those still alive renew theirs
# (a lapsed key is renewed while its gateway is registered) within the grace. Reaping a
# peer that is merely late would announce its users as left, then as joined again.
HEARTBEAT = """
local gid, instance, ttl = ARGV[5], ARGV[6], ARGV[7]
local current = redis.call('GET', alive_key(gid))
if current == instance or (not current and registered_instance(gid) == instance) then
  redis.call('SET', alive_key(gid), instance, 'PX', ttl)
  beat_pulse(ttl)
  return 1
end
if current then return -1 end
return 0
"""

# Every registered gateway whose liveness key has expired is forgotten and queued for
# eviction, unless an outage's grace is on (see HEARTBEAT). Returns every gateway still
# queued (this call's and any earlier reaper's that did not finish): whoever calls evicts
# their users.
REAP = """
if redis.call('EXISTS', GRACE) == 0 then
  for _, gid in ipairs(redis.call('HKEYS', GATEWAYS)) do
    if redis.call('EXISTS', alive_key(gid)) == 0 then
      redis.call('HDEL', GATEWAYS, gid)
      redis.call('SADD', REAPING, gid)
    end
  end
end
return redis.call('SMEMBERS', REAPING)
"""

# ARGV[5..6]: gateway id, "1" to spare the sessions of the instance that holds the id now
# (a reaper or a new run evicts only what a dead instance left behind). The presence
# records of the users to evict: {key, record, ...}.
HELD_BY = """
local gid, spare = ARGV[5], ARGV[6] == '1'
local live = spare and redis.call('GET', alive_key(gid))
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', users_key(gid))) do
  local rec = redis.call('HGET', ONLINE, key)
  local p = rec and cjson.decode(rec)
  if p and p.gateway == gid then
    if not (live and string.sub(p.session, 1, #live + 1) == live .. '-') then
      out[#out + 1] = key
      out[#out + 1] = rec
    end
  else
    redis.call('SREM', users_key(gid), key)
  end
end
return out
"""

# ARGV[5]: gateway id; then pairs of name key, session id. Frees those names (their leaves
# were announced in their rooms); once the gateway holds none, or its id is live again, it
# leaves the reaping queue. Returns {names it still holds, 1 if this call took it off the
# queue (of reapers racing, one finishes) else 0}.
FORGET = """
local gid = ARGV[5]
for i = 6, #ARGV, 2 do
  local rec = redis.call('HGET', ONLINE, ARGV[i])
  if rec and cjson.decode(rec).session == ARGV[i + 1] then
    redis.call('HDEL', ONLINE, ARGV[i])
    redis.call('HDEL', ACTIVITY, ARGV[i])
  end
  redis.call('SREM', users_key(gid), ARGV[i])
end
local left = redis.call('SCARD', users_key(gid))
local finished = 0
if left == 0 or redis.call('EXISTS', alive_key(gid)) == 1 then
  finished = redis.call('SREM', REAPING, gid)
end
return {left, finished}
"""

# ARGV[5..6]: gateway id, instance. The end of a clean stop (its users evicted already):
# the gateway is forgotten. Returns 1, or -1 if the id is not ours.
DEREGISTER = """
local gid, instance = ARGV[5], ARGV[6]
local current = redis.call('GET', alive_key(gid))
if current and current ~= instance then return -1 end
redis.call('DEL', alive_key(gid))
if registered_instance(gid) == instance then redis.call('HDEL', GATEWAYS, gid) end
return 1
"""

# ARGV[5..6]: name key, encoded inbox event. Sends the event to the gateway holding the
# name, and to no other. Returns {1, display name, session, gateway, receivers} | {0} if
# nobody holds the name.
SEND_TO_HOLDER = """
local rec = redis.call('HGET', ONLINE, ARGV[5])
if not rec then return {0} end
local p = cjson.decode(rec)
local receivers = redis.call(PUBLISH, inbox(p.gateway), ARGV[6])
return {1, p.name, p.session, p.gateway, receivers}
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
# five: name key, display name, session id, since (ms), room key. A gateway whose
# registration was lost (reaped, or Redis lost its data) registers again and restores its
# users' presence in one step, so that no release can slip in between and find a user
# neither gone nor restored. Returns {1, name keys held meanwhile by other sessions...},
# {-1} if another instance holds the gateway id, or {-2} while the gateway's eviction is
# still under way (finish it, then call again).
RESTORE = """
local gid, instance, record, ttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if redis.call('SISMEMBER', REAPING, gid) == 1 then return {-2} end
local current = redis.call('GET', alive_key(gid))
if current and current ~= instance then return {-1} end
beat_pulse(ttl)
redis.call('SET', alive_key(gid), instance, 'PX', ttl)
redis.call('HSET', GATEWAYS, gid, record)
local result = {1}
for i = 9, #ARGV, 5 do
  local key, name, session, since, room =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local held = redis.call('HGET', ONLINE, key)
  if held then
    if cjson.decode(held).session ~= session then result[#result + 1] = key end
  else
    redis.call('HSET', ONLINE, key, presence(name, gid, session, since, room))
    redis.call('SADD', users_key(gid), key)
  end
end
return result
"""

GLOBAL_SCRIPTS = {
    "claim": CLAIM,
    "set_room": SET_ROOM,
    "release": RELEASE,
    "register": REGISTER,
    "heartbeat": HEARTBEAT,
    "reap": REAP,
    "held_by": HELD_BY,
    "forget": FORGET,
    "deregister": DEREGISTER,
    "send_to_holder": SEND_TO_HOLDER,
    "touch": TOUCH,
    "restore": RESTORE,
}

ROOM_SCRIPTS = {
    "publish": PUBLISH,
    "enter": ENTER,
    "leave": LEAVE,
    "force_leave": FORCE_LEAVE,
}


def sources(sharded: bool) -> dict[str, str]:
    """Every script's full source by name; ``sharded`` publishes with ``SPUBLISH``."""
    header = f"local PUBLISH = '{'SPUBLISH' if sharded else 'PUBLISH'}'\n"
    return {
        name: header + prelude + body
        for prelude, table in ((GLOBAL_PRELUDE, GLOBAL_SCRIPTS), (ROOM_PRELUDE, ROOM_SCRIPTS))
        for name, body in table.items()
    }
