"""The Lua scripts of the Redis store: each change is one atomic script.

A script checks the device's version, takes the next cursor(s) with INCR,
stores the new state and appends it to the change stream, so every
broker process sees the same versions and cursors (redis_layout.py has
the key layout).
"""

# The scripts. Stream fields: t (type) n (number) v (version) c (cursor)
# s (state) e (events, CBOR) o (origin process) and per type below.
# CHANGE takes its states as triples (state, events, flags); f (flags) is
# what a follower needs without decoding the state: the online bit (1) and
# "desired may have changed" (2), see shared_stream.py. A session record
# written with states rides on the last state's entry (field r: one stream
# entry fewer for every follower to read); alone, it is an entry of type r.
#
# Presence (shared_presence.py): field h of a device is the process holding
# its session ("holder", its origin), and {p}:held:<holder> the set of the
# devices it holds. A state with flag 4 (claim) makes the writer the
# holder; a state with the online bit clear leaves the device without one.
# ARGV after the record: a condition ('' none; '=X': only if X holds the
# device; '~X': only if X or nobody does, else the answer is 'moved') and
# the key prefix of the held sets ('' leaves the holder alone).
CHANGE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'missing', 0, 0} end
v = tonumber(v)
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= v then return {'conflict', 0, v} end
if tonumber(ARGV[1]) ~= v then return {'stale', 0, v} end
local number, origin, maxlen, k = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local first, c, blob = 0, 0, nil
local record = ARGV[7 + 3 * k]
local cond, held = ARGV[8 + 3 * k] or '', ARGV[9 + 3 * k] or ''
if cond ~= '' then
  local h = redis.call('HGET', KEYS[1], 'h')
  if h ~= string.sub(cond, 2) and (string.sub(cond, 1, 1) == '=' or h) then
    return {'moved', 0, v}
  end
end
local holder = nil
for i = 1, k do
  c = redis.call('INCR', KEYS[2])
  if i == 1 then first = c end
  v = v + 1
  blob = ARGV[4 + 3 * i]
  local f = tonumber(ARGV[6 + 3 * i])
  if bit.band(f, 4) ~= 0 then holder = origin elseif bit.band(f, 1) == 0 then holder = '' end
  if i == k and record ~= '' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, c .. '-*', 't', 's', 'n', number,
               'v', v, 'c', c, 's', blob, 'e', ARGV[5 + 3 * i], 'f', ARGV[6 + 3 * i],
               'o', origin, 'r', record)
  else
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, c .. '-*', 't', 's', 'n', number,
               'v', v, 'c', c, 's', blob, 'e', ARGV[5 + 3 * i], 'f', ARGV[6 + 3 * i],
               'o', origin)
  end
end
if k > 0 and record ~= '' then redis.call('HSET', KEYS[1], 'v', v, 'c', c, 's', blob, 'r', record)
elseif k > 0 then redis.call('HSET', KEYS[1], 'v', v, 'c', c, 's', blob) end
if holder and held ~= '' then
  local old = redis.call('HGET', KEYS[1], 'h')
  if old and old ~= holder then redis.call('SREM', held .. old, number) end
  if holder == '' then redis.call('HDEL', KEYS[1], 'h')
  else
    redis.call('HSET', KEYS[1], 'h', holder)
    redis.call('SADD', held .. holder, number)
  end
end
if record ~= '' and k == 0 then
  redis.call('HSET', KEYS[1], 'r', record)
  local top = redis.call('GET', KEYS[2]) or '0'
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, top .. '-*', 't', 'r', 'n', number,
             'r', record, 'o', origin)
end
return {'ok', first, v}
"""

ADD = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'exists', 0, 0} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'taken', 0, 0} end
local c = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'v', 1, 'c', c, 'n', ARGV[1], 'k', ARGV[3], 's', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], c .. '-*', 't', 'a', 'n', ARGV[2],
           'v', 1, 'c', c, 'm', ARGV[1], 'k', ARGV[3], 's', ARGV[4], 'o', ARGV[5])
return {'ok', c, 1}
"""

REMOVE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'missing', 0, 0} end
local name = redis.call('HGET', KEYS[1], 'n')
v = tonumber(v) + 1
local c = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], name)
redis.call('ZADD', KEYS[5], c, ARGV[1] .. ':' .. v .. ':' .. name)
local keep = tonumber(ARGV[4])
if redis.call('ZCARD', KEYS[5]) > keep then
  local old = redis.call('ZRANGE', KEYS[5], 0, -keep - 1, 'WITHSCORES')
  redis.call('SET', KEYS[6], old[#old])
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -keep - 1)
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], c .. '-*', 't', 'x', 'n', ARGV[1],
           'v', v, 'c', c, 'm', name, 'o', ARGV[2])
return {'ok', c, v}
"""

SECRET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', 0, 0} end
redis.call('HSET', KEYS[1], 'k', ARGV[2])
local top = redis.call('GET', KEYS[2]) or '0'
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], top .. '-*', 't', 'k', 'n', ARGV[1],
           'k', ARGV[2], 'o', ARGV[3])
return {'ok', 0, 0}
"""

TOKENS = """
if ARGV[1] == 'add' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
else redis.call('HDEL', KEYS[1], ARGV[2]) end
local top = redis.call('GET', KEYS[2]) or '0'
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], top .. '-*', 't', 't', 'o', ARGV[4])
return {'ok', 0, 0}
"""

# The presence lease of one process (shared_presence.py): KEYS lease key,
# {p}:holders; ARGV origin, TTL (ms). Answers whether the lease was still
# there (0: it expired, or this is the first).
LEASE = """
local had = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return {'ok', had, 0}
"""

# Holders whose lease expired, each with (up to ARGV[5] of) the devices it
# still holds: {holder, {number...}, ...}. KEYS {p}:holders; ARGV origin
# (never itself), lease prefix, held prefix, device key prefix, count.
# Stale members (the device moved on or is gone) are dropped; a holder
# left holding nothing is forgotten.
EXPIRED = """
local out = {}
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if h ~= ARGV[1] and redis.call('EXISTS', ARGV[2] .. h) == 0 then
    local held = ARGV[3] .. h
    local found = {}
    for _, n in ipairs(redis.call('SRANDMEMBER', held, tonumber(ARGV[5]))) do
      if redis.call('HGET', ARGV[4] .. n, 'h') == h then found[#found + 1] = n
      else redis.call('SREM', held, n) end
    end
    if #found > 0 then
      out[#out + 1] = h
      out[#out + 1] = found
    elseif redis.call('SCARD', held) == 0 then
      redis.call('SREM', KEYS[1], h)
    end
  end
end
return out
"""
