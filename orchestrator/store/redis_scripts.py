"""Lua scripts of the Redis backend: each store operation is one script, so it is atomic.

Every script gets the same five keys of one session, which share the hash tag
``{session_id}`` (one cluster slot):

    KEYS[1] meta   hash   token (SHA-256 of the resume token), config (JSON),
                          bytes (total size of the item bodies)
    KEYS[2] order  list   item ids in conversation order
    KEYS[3] items  hash   item id -> item JSON
    KEYS[4] turn   string turn state JSON
    KEYS[5] lease  string owner id, with its own short TTL (the lease expiry)

The meta hash marks a live session. Every write refreshes the idle TTL of keys 1-4 inside
the same script, so a session's keys always expire together. Scripts answer a table whose
first element is a status word (``ok``, ``notfound``, ``busy`` ...); the Python side maps
it to the store's errors.

Every write script takes a fence owner as its last ARGV ('' for an unfenced write). Right
after the session check, ``fenced(owner)`` compares it with the lease key and the script
answers ``lost`` before it writes anything: the check and the write are one atomic step,
so a connection whose lease was taken over (or lapsed: the key expired) cannot write.
"""

from __future__ import annotations

_PRELUDE = """
local function alive() return redis.call('EXISTS', KEYS[1]) == 1 end
local function fenced(owner)
  return owner ~= '' and redis.call('GET', KEYS[5]) ~= owner
end
local function refresh(ttl)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
local function snapshot(out)
  out[#out + 1] = redis.call('HGET', KEYS[1], 'config')
  out[#out + 1] = redis.call('GET', KEYS[4]) or ''
  local ids = redis.call('LRANGE', KEYS[2], 0, -1)
  for i = 1, #ids, 500 do
    local chunk = {}
    for j = i, math.min(i + 499, #ids) do chunk[#chunk + 1] = ids[j] end
    local bodies = redis.call('HMGET', KEYS[3], unpack(chunk))
    for j = 1, #chunk do
      if bodies[j] then out[#out + 1] = bodies[j] end
    end
  end
  return out
end
"""

# ARGV: token hash, config JSON, ttl ms, owner ('' for none), lease ms
CREATE = _PRELUDE + """
if alive() then return {'exists'} end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'config', ARGV[2])
refresh(ARGV[3])
if ARGV[4] ~= '' then redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5]) end
return {'ok'}
"""

# ARGV: token hash, ttl ms, owner ('' for none), lease ms, takeover ('1'/'0')
# -> {'ok', config, turn or '', item...}
RESUME = _PRELUDE + """
if not alive() then return {'notfound'} end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return {'badtoken'} end
local cur = redis.call('GET', KEYS[5])
if cur and cur ~= ARGV[3] and ARGV[5] ~= '1' then return {'busy'} end
if ARGV[3] ~= '' then redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[4]) end
refresh(ARGV[2])
return snapshot({'ok'})
"""

# -> {'ok', config, turn or '', item...}
SNAPSHOT = _PRELUDE + """
if not alive() then return {'notfound'} end
return snapshot({'ok'})
"""

# ARGV: item id, item JSON, mode ('end'/'root'/'after'), previous id, ttl ms, max items,
# max session bytes, fence owner -> {'ok', position}
APPEND = _PRELUDE + """
if not alive() then return {'notfound'} end
if fenced(ARGV[8]) then return {'lost'} end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {'exists'} end
local n = redis.call('LLEN', KEYS[2])
if n >= tonumber(ARGV[6]) then return {'limit', n} end
local total = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0') + string.len(ARGV[2])
if total > tonumber(ARGV[7]) then return {'toobig', total} end
local pos
if ARGV[3] == 'end' then
  pos = redis.call('RPUSH', KEYS[2], ARGV[1]) - 1
elseif ARGV[3] == 'root' then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  pos = 0
else
  local p = redis.call('LPOS', KEYS[2], ARGV[4])
  if not p then return {'noprev'} end
  redis.call('LINSERT', KEYS[2], 'AFTER', ARGV[4], ARGV[1])
  pos = p + 1
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'bytes', total)
refresh(ARGV[5])
return {'ok', pos}
"""

# ARGV: item id, item JSON, ttl ms, max session bytes, fence owner
UPDATE_ITEM = _PRELUDE + """
if not alive() then return {'notfound'} end
if fenced(ARGV[5]) then return {'lost'} end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return {'noitem'} end
local total = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
  - redis.call('HSTRLEN', KEYS[3], ARGV[1]) + string.len(ARGV[2])
if total > tonumber(ARGV[4]) then return {'toobig', total} end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'bytes', total)
refresh(ARGV[3])
return {'ok'}
"""

# ARGV: item id, ttl ms, fence owner
DELETE_ITEM = _PRELUDE + """
if not alive() then return {'notfound'} end
if fenced(ARGV[3]) then return {'lost'} end
local size = redis.call('HSTRLEN', KEYS[3], ARGV[1])
if redis.call('HDEL', KEYS[3], ARGV[1]) == 0 then return {'noitem'} end
redis.call('HINCRBY', KEYS[1], 'bytes', -size)
redis.call('LREM', KEYS[2], 1, ARGV[1])
refresh(ARGV[2])
return {'ok'}
"""

# ARGV: config JSON, ttl ms, fence owner
SET_CONFIG = _PRELUDE + """
if not alive() then return {'notfound'} end
if fenced(ARGV[3]) then return {'lost'} end
redis.call('HSET', KEYS[1], 'config', ARGV[1])
refresh(ARGV[2])
return {'ok'}
"""

# ARGV: turn state JSON, ttl ms, fence owner
SET_TURN = _PRELUDE + """
if not alive() then return {'notfound'} end
if fenced(ARGV[3]) then return {'lost'} end
redis.call('SET', KEYS[4], ARGV[1])
refresh(ARGV[2])
return {'ok'}
"""

# ARGV: ttl ms, fence owner
TOUCH = _PRELUDE + """
if not alive() then return {'notfound'} end
if fenced(ARGV[2]) then return {'lost'} end
refresh(ARGV[1])
return {'ok'}
"""

# ARGV: fence owner
DELETE_SESSION = _PRELUDE + """
local existed = alive()
if existed and fenced(ARGV[1]) then return {'lost'} end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if existed then return {'ok'} end
return {'notfound'}
"""

# ARGV: owner, lease ms, takeover ('1'/'0')
ACQUIRE_LEASE = _PRELUDE + """
if not alive() then return {'notfound'} end
local cur = redis.call('GET', KEYS[5])
if cur and cur ~= ARGV[1] and ARGV[3] ~= '1' then return {'busy'} end
redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[2])
return {'ok'}
"""

# ARGV: owner, lease ms, ttl ms
RENEW_LEASE = _PRELUDE + """
if not alive() then return {'notfound'} end
if redis.call('GET', KEYS[5]) ~= ARGV[1] then return {'lost'} end
redis.call('PEXPIRE', KEYS[5], ARGV[2])
refresh(ARGV[3])
return {'ok'}
"""

# ARGV: owner
RELEASE_LEASE = _PRELUDE + """
if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
return {'ok'}
"""

# -> {'ok', owner or ''}
LEASE_OWNER = _PRELUDE + """
if not alive() then return {'notfound'} end
return {'ok', redis.call('GET', KEYS[5]) or ''}
"""

# ARGV: item id -> {'ok', item JSON} / {'noitem'}
GET_ITEM = _PRELUDE + """
if not alive() then return {'notfound'} end
local body = redis.call('HGET', KEYS[3], ARGV[1])
if not body then return {'noitem'} end
return {'ok', body}
"""

# -> {'ok', config, turn or ''}
GET_CONFIG_TURN = _PRELUDE + """
if not alive() then return {'notfound'} end
return {'ok', redis.call('HGET', KEYS[1], 'config'), redis.call('GET', KEYS[4]) or ''}
"""
