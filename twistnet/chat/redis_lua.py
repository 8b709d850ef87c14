"""
The Lua scripts of the shared room: each change to Redis is one script, so it is atomic.

Keys (all under one hash tag, C{{prefix}}):
  - C{names}: hash, casefolded name -> C{"owner name"}, owner being C{"server:member"}.
  - C{members:<server>}: hash, member id -> casefolded name, what a server holds.
  - C{servers}: set of registered server ids; C{alive:<server>}: its liveness key (TTL).
  - C{stream}: the room's stream; C{seq}: its sequence counter; C{guests}: guest counter.
  - C{epoch}: a random value set once per Redis dataset, to tell a Redis that restarted
    empty from one that kept its data.

Every stream entry has two fields: C{seq} (consecutive: a reader that sees a gap missed lines)
and C{m}, C{"kind skip to\\n"} then the data: C{kind} is C{line}, C{notice} or C{private},
C{skip} the owner it is not delivered to, C{to} the owner of a private line (either may be
empty), the data whole lines ending in CR LF. One packed field, not five: each bulk string is
parsed in Python by every server for every line, and that was most of the stream's cost.

Lua cannot casefold: Python passes every key already casefolded.
"""

from __future__ import annotations

_APPEND = """
local function append(stream, seq, maxlen, kind, skip, to, data)
  local n = redis.call('INCR', seq)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
             'seq', n, 'm', kind .. ' ' .. skip .. ' ' .. to .. '\\n' .. data)
  return n
end
local function owned_by(held, owner)
  return held and string.sub(held, 1, #owner + 1) == owner .. ' '
end
"""

#: KEYS names members stream seq guests
#: ARGV owner member maxlen guest_prefix guest_key_prefix wanted_key wanted what
#: Claims C{wanted} (if free or already ours) or a fresh guest name; announces it with
#: C{what} unless it was already ours; gives up a name the member held before. Returns the
#: name.
JOIN = (
    _APPEND
    + """
local owner, name, key = ARGV[1], nil, nil
-- A name this member held before (claimed by an attempt that timed out, or renamed while
-- Redis was out of reach) is given up first, so it cannot stay behind as a ghost.
local previous = redis.call('HGET', KEYS[2], ARGV[2])
if previous and previous ~= ARGV[6] and owned_by(redis.call('HGET', KEYS[1], previous), owner) then
  redis.call('HDEL', KEYS[1], previous)
end
if ARGV[6] ~= '' then
  local held = redis.call('HGET', KEYS[1], ARGV[6])
  if held == owner .. ' ' .. ARGV[7] then
    redis.call('HSET', KEYS[2], ARGV[2], ARGV[6])
    return ARGV[7]
  end
  if not held then
    redis.call('HSET', KEYS[1], ARGV[6], owner .. ' ' .. ARGV[7])
    name, key = ARGV[7], ARGV[6]
  end
end
while not name do
  local n = redis.call('INCR', KEYS[5])
  if redis.call('HSETNX', KEYS[1], ARGV[5] .. n, owner .. ' ' .. ARGV[4] .. n) == 1 then
    name, key = ARGV[4] .. n, ARGV[5] .. n
  end
end
redis.call('HSET', KEYS[2], ARGV[2], key)
append(KEYS[3], KEYS[4], ARGV[3], 'notice', owner, '', '*** ' .. name .. ' ' .. ARGV[8] .. '\\r\\n')
return name
"""
)

#: KEYS names members stream seq; ARGV owner member maxlen suffix announce
#: Frees the member's name if it still holds it. Returns 1 if it did.
LEAVE = (
    _APPEND
    + """
local key = redis.call('HGET', KEYS[2], ARGV[2])
if not key then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
local held = redis.call('HGET', KEYS[1], key)
if not owned_by(held, ARGV[1]) then return 0 end
redis.call('HDEL', KEYS[1], key)
if ARGV[5] == '1' then
  append(KEYS[3], KEYS[4], ARGV[3], 'notice', '', '',
         '*** ' .. string.sub(held, #ARGV[1] + 2) .. ' has left' .. ARGV[4] .. '\\r\\n')
end
return 1
"""
)

#: KEYS names members stream seq; ARGV owner member maxlen new_key new_name
#: Returns {'ok', old}, {'same', old}, {'taken', holder} or {'gone', ''}.
RENAME = (
    _APPEND
    + """
local key = redis.call('HGET', KEYS[2], ARGV[2])
if not key then return {'gone', ''} end
local held = redis.call('HGET', KEYS[1], key)
if not owned_by(held, ARGV[1]) then return {'gone', ''} end
local old = string.sub(held, #ARGV[1] + 2)
if old == ARGV[5] then return {'same', old} end
local other = redis.call('HGET', KEYS[1], ARGV[4])
if other and not owned_by(other, ARGV[1]) then
  return {'taken', string.sub(other, string.find(other, ' ', 1, true) + 1)}
end
redis.call('HDEL', KEYS[1], key)
redis.call('HSET', KEYS[1], ARGV[4], ARGV[1] .. ' ' .. ARGV[5])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
append(KEYS[3], KEYS[4], ARGV[3], 'notice', '', '',
       '*** ' .. old .. ' is now known as ' .. ARGV[5] .. '\\r\\n')
return {'ok', old}
"""
)

#: KEYS stream seq; ARGV maxlen, then kind skip data for each entry, in order.
#: What a server's members said in one reactor turn, appended in one round trip.
SAY = (
    _APPEND
    + """
for i = 2, #ARGV, 3 do
  append(KEYS[1], KEYS[2], ARGV[1], ARGV[i], ARGV[i + 1], '', ARGV[i + 2])
end
return #ARGV
"""
)

#: KEYS names stream seq; ARGV key maxlen data. Returns 0 if no one has that name.
PRIVATE = (
    _APPEND
    + """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
local owner = string.sub(held, 1, string.find(held, ' ', 1, true) - 1)
append(KEYS[2], KEYS[3], ARGV[2], 'private', '', owner, ARGV[3])
return 1
"""
)

#: KEYS servers alive epoch; ARGV server ttl_ms epoch
#: Returns 'ok', 'dead' (the server was reaped) or 'epoch' (Redis lost its data).
HEARTBEAT = """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return 'epoch' end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 'dead' end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 'ok'
"""

#: KEYS servers alive epoch; ARGV server ttl_ms fresh_epoch. Returns the epoch in force.
REGISTER = """
redis.call('SET', KEYS[3], ARGV[3], 'NX')
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return redis.call('GET', KEYS[3])
"""

#: KEYS servers alive members names stream seq; ARGV server maxlen reason force
#: Announces the departure of every member of a server and frees their names, once: the
#: janitor that removes the server from C{servers} first wins; a live server is left alone
#: unless C{force} (a server leaving on purpose).
REAP = (
    _APPEND
    + """
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 and ARGV[4] ~= '1' then return 0 end
redis.call('DEL', KEYS[2])
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local owner = ARGV[1] .. ':' .. all[i]
  local held = redis.call('HGET', KEYS[4], all[i + 1])
  if owned_by(held, owner) then
    redis.call('HDEL', KEYS[4], all[i + 1])
    append(KEYS[5], KEYS[6], ARGV[2], 'notice', '', '',
           '*** ' .. string.sub(held, #owner + 2) .. ' has left (' .. ARGV[3] .. ')\\r\\n')
  end
end
redis.call('DEL', KEYS[3])
return 1
"""
)
