"""The Lua scripts of the Redis store: each change is one atomic script.

A script checks the device's version, takes the next cursor(s) with INCR,
stores the new state and appends it to the change stream, so every
broker process sees the same versions and cursors (redis_layout.py has
the key layout).

Two rules every script here keeps (tests/scale/test_redis_scripts.py
enforces both):

* Every key it touches is one of its KEYS, never a name built from ARGV or
  from Redis data: Redis Cluster and Redis 7 support only declared keys in
  scripts. Where the key depends on data (a holder's set, a dead holder's
  devices), the caller reads that data first and declares the keys in a
  second script (shared_presence.py).
* It starts with ``CHECK``: its last KEY is the data set's marker
  ``{p}:incarnation`` and its last ARGV the marker this process loaded
  (the store appends both). A Redis whose marker is missing or another one
  lost the data this process has: the script changes nothing and answers
  ``{'lost', marker found, 0}`` (shared.py, Redis losing data). One GET.
"""

#: The start of every script: is this the data set the caller loaded?
CHECK = """
local incarnation = redis.call('GET', KEYS[#KEYS])
if incarnation ~= ARGV[#ARGV] then return {'lost', incarnation or '', 0} end
"""

# Fixed-width hex numbers compared byte by byte (Lua's < on strings follows
# the server's locale; its numbers lose u64 precision).
LESS = """
local function less(a, b)
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return false
end
"""

# The session id and reservation (hex, as in ri / rr) of a record written
# before those fields: the CBOR array of redis_layout.encode_record, items
# 1 and 6 (unsigned), skipping 2 and 4 (unsigned) and 3 and 5 (bytes).
# nil for anything else: the write is then refused (never guess).
LEGACY = """
local function uint(blob, pos)
  local b = string.byte(blob, pos)
  if not b or b > 27 then return nil end
  if b < 24 then return string.rep('0', 14) .. string.format('%02x', b), pos + 1 end
  local n = ({[24] = 1, [25] = 2, [26] = 4, [27] = 8})[b]
  if pos + n > #blob then return nil end
  local hex = ''
  for i = 1, n do hex = hex .. string.format('%02x', string.byte(blob, pos + i)) end
  return string.rep('0', 16 - 2 * n) .. hex, pos + 1 + n
end
local function skip_bytes(blob, pos)
  local b = string.byte(blob, pos)
  if not b or b < 64 or b > 90 then return nil end
  local len, n = b - 64, 0
  if len >= 24 then
    n = ({[24] = 1, [25] = 2, [26] = 4})[len]
    if pos + n > #blob then return nil end
    len = 0
    for i = 1, n do len = len * 256 + string.byte(blob, pos + i) end
  end
  return pos + 1 + n + len
end
local function legacy(blob)
  local head = string.byte(blob, 1)
  if not head or head < 0x86 or head > 0x97 then return nil end
  local sid, pos = uint(blob, 2)
  if not sid then return nil end
  local _
  _, pos = uint(blob, pos)
  if not pos then return nil end
  pos = skip_bytes(blob, pos)
  if not pos then return nil end
  _, pos = uint(blob, pos)
  if not pos then return nil end
  pos = skip_bytes(blob, pos)
  if not pos then return nil end
  local res = uint(blob, pos)
  if not res then return nil end
  return sid, res
end
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
# device; '~X': only if X or nobody does, else the answer is 'moved'; '~?X':
# as '~X', and if X holds the device and another process heard it lately
# (field hu, HEARD below, compared with Redis's own clock) the answer is
# {'heard', milliseconds hu has left, version}: an HTTP device's holder
# does not mark it offline while it talks to another process).
# KEYS: the device, {p}:seq, {p}:feed, the writer's held set, and the held
# set of the holder '=X' names (else the writer's again). A claim does not
# touch the previous holder's set (its name is Redis data, not declared):
# that process drops the device from its set itself (LEASE, or here when
# its own '~' write is answered 'moved': its stream may not have shown the
# claim yet, so LEASE would not be told), or the reaping of a dead holder
# does (HELD, and here on 'moved').
#
# Session records (wire.md 7, a sequence reservation is a compare-and-set):
# ARGV after the condition: the record's session id and reservation (16
# hex digits each) and its own condition: '' (a plain write: refused if the
# stored record is a newer session's or has a higher reservation), 'n' (a
# new session's start: only over an older session's record or none) or
# '=R' (only over this session's record with reservation R). Fields ri and
# rr of the device keep the stored record's id and reservation for this
# check (Lua does not decode the CBOR record); a record written before
# they existed is read by LEGACY, and one it cannot read refuses every
# record write. A refused record is not written (states are): the answer
# then carries the stored record as a fourth item.
CHANGE = CHECK + LESS + LEGACY + """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'missing', 0, 0} end
v = tonumber(v)
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= v then return {'conflict', 0, v} end
if tonumber(ARGV[1]) ~= v then return {'stale', 0, v} end
local number, origin, maxlen, k = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local first, c, blob = 0, 0, nil
local record, cond = ARGV[7 + 3 * k], ARGV[8 + 3 * k]
local quiet = string.sub(cond, 1, 2) == '~?'
local named = string.sub(cond, quiet and 3 or 2)
local old, known = nil, false
if cond ~= '' then
  old, known = redis.call('HGET', KEYS[1], 'h'), true
  if old ~= named and (string.sub(cond, 1, 1) == '=' or old) then
    if string.sub(cond, 1, 1) == '=' then redis.call('SREM', KEYS[5], number)
    else redis.call('SREM', KEYS[4], number) end
    return {'moved', 0, v}
  end
  if quiet and old then
    local heard = redis.call('HGET', KEYS[1], 'hu')
    if heard then
      local t = redis.call('TIME')
      local left = tonumber(heard) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
      if left > 0 then return {'heard', left, v} end
    end
  end
end
local refused, rid, rres = nil, nil, nil
if record ~= '' then
  local rcond = ARGV[11 + 3 * k]
  rid, rres = ARGV[9 + 3 * k], ARGV[10 + 3 * k]
  local found = redis.call('HMGET', KEYS[1], 'ri', 'rr')
  local sid, sres, stored = found[1], found[2], nil
  if not sid then
    stored = redis.call('HGET', KEYS[1], 'r')
    if stored then sid, sres = legacy(stored) end
  end
  local ok
  if stored and not sid then ok = false
  elseif rcond == 'n' then ok = (not sid) or less(sid, rid)
  elseif rcond ~= '' then ok = sid == rid and sres == string.sub(rcond, 2)
  else ok = (not sid) or less(sid, rid) or (sid == rid and not less(rres, sres)) end
  if not ok then
    refused = stored or redis.call('HGET', KEYS[1], 'r') or ''
    record = ''
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
if k > 0 and record ~= '' then
  redis.call('HSET', KEYS[1], 'v', v, 'c', c, 's', blob, 'r', record, 'ri', rid, 'rr', rres)
elseif k > 0 then redis.call('HSET', KEYS[1], 'v', v, 'c', c, 's', blob) end
if holder then
  if not known then old = redis.call('HGET', KEYS[1], 'h') end
  if holder == '' then
    redis.call('HDEL', KEYS[1], 'hu')
    if old then
      if old == origin then redis.call('SREM', KEYS[4], number)
      elseif old == named then redis.call('SREM', KEYS[5], number) end
      redis.call('HDEL', KEYS[1], 'h')
    end
  else
    if old ~= holder then redis.call('HSET', KEYS[1], 'h', holder) end
    redis.call('SADD', KEYS[4], number)
  end
end
if record ~= '' and k == 0 then
  redis.call('HSET', KEYS[1], 'r', record, 'ri', rid, 'rr', rres)
  local top = redis.call('GET', KEYS[2]) or '0'
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, top .. '-*', 't', 'r', 'n', number,
             'r', record, 'o', origin)
end
if refused then return {'ok', first, v, refused} end
return {'ok', first, v}
"""

ADD = CHECK + """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'exists', 0, 0} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'taken', 0, 0} end
local c = redis.call('INCR', KEYS[3])
-- A new device's first version is its creation's cursor: never one its name's
-- earlier incarnations had (an old ETag must not match it; restart.py).
redis.call('HSET', KEYS[1], 'v', c, 'c', c, 'n', ARGV[1], 'k', ARGV[3], 's', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], c .. '-*', 't', 'a', 'n', ARGV[2],
           'v', c, 'c', c, 'm', ARGV[1], 'k', ARGV[3], 's', ARGV[4], 'o', ARGV[5])
return {'ok', c, c}
"""

REMOVE = CHECK + """
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

SECRET = CHECK + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', 0, 0} end
redis.call('HSET', KEYS[1], 'k', ARGV[2])
local top = redis.call('GET', KEYS[2]) or '0'
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], top .. '-*', 't', 'k', 'n', ARGV[1],
           'k', ARGV[2], 'o', ARGV[3])
return {'ok', 0, 0}
"""

TOKENS = CHECK + """
if ARGV[1] == 'add' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
else redis.call('HDEL', KEYS[1], ARGV[2]) end
local top = redis.call('GET', KEYS[2]) or '0'
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], top .. '-*', 't', 't', 'o', ARGV[4])
return {'ok', 0, 0}
"""

# A device heard over HTTP by a process that does not hold it
# (shared_presence.py, share_heard): KEYS the device; ARGV the process,
# then milliseconds. Field hu becomes Redis's time now plus those
# milliseconds (never earlier than it was): until then the holder's HTTP
# offline write ('~?X', CHANGE) is answered 'heard'; any offline state
# clears it. Not a change: no version, no cursor, no stream entry, and not
# in redis_writer.DURABLE (a share lost with a failover is made again
# within half offline_after). Nothing is written for a device nobody holds
# (offline, or gone) or held by the caller. Answers {'ok'}, {'idle'} or
# {'holder'}, then 0, 0. (TIME before a write needs Redis to replicate a
# script's effects, its default since Redis 5, which streams need anyway.)
HEARD = CHECK + """
local h = redis.call('HGET', KEYS[1], 'h')
if not h then return {'idle', 0, 0} end
if h == ARGV[1] then return {'holder', 0, 0} end
local t = redis.call('TIME')
local heard = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local was = tonumber(redis.call('HGET', KEYS[1], 'hu') or '0')
if heard > was then redis.call('HSET', KEYS[1], 'hu', string.format('%.0f', heard)) end
return {'ok', 0, 0}
"""

# The presence lease of one process (shared_presence.py): KEYS its lease key,
# {p}:holders, its held set, then the keys of devices that left it (another
# process claimed them, or they were removed); ARGV origin, TTL (ms), then
# those devices' numbers. Each of them still in the held set is dropped
# unless Redis says this process holds it again. Answers whether the lease
# was still there (0: it expired, or this is the first) and the processes
# with a lease (for EXPIRED).
LEASE = CHECK + """
local had = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
for i = 4, #KEYS - 1 do
  if redis.call('HGET', KEYS[i], 'h') ~= ARGV[1] then redis.call('SREM', KEYS[3], ARGV[i - 1]) end
end
return {'ok', had, redis.call('SMEMBERS', KEYS[2])}
"""

# Which of the holders LEASE listed lost their lease: KEYS {p}:holders, then
# for each holder its lease key and its held set; ARGV count, then the
# holders. Answers {'ok', {holder, {number...}, ...}}: each expired holder
# with (up to count of) the devices its set still names, for HELD to check.
# An expired holder whose set is empty is forgotten.
EXPIRED = CHECK + """
local out = {}
for j = 1, #ARGV - 2 do
  local h = ARGV[j + 1]
  if redis.call('EXISTS', KEYS[2 * j]) == 0 then
    if redis.call('SCARD', KEYS[2 * j + 1]) == 0 then redis.call('SREM', KEYS[1], h)
    else
      out[#out + 1] = h
      out[#out + 1] = redis.call('SRANDMEMBER', KEYS[2 * j + 1], tonumber(ARGV[1]))
    end
  end
end
return {'ok', out}
"""

# The devices an expired holder still holds, among those EXPIRED named:
# KEYS {p}:holders, its lease key, its held set, then the devices' keys;
# ARGV the holder, then the devices' numbers. Members it no longer holds
# (the device moved on or is gone) are dropped, and a holder left holding
# nothing (and still without a lease) is forgotten. Answers {'ok', {number...}}.
HELD = CHECK + """
local found = {}
for i = 4, #KEYS - 1 do
  if redis.call('HGET', KEYS[i], 'h') == ARGV[1] then found[#found + 1] = ARGV[i - 2]
  else redis.call('SREM', KEYS[3], ARGV[i - 2]) end
end
if #found == 0 and redis.call('SCARD', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[1], ARGV[1])
end
return {'ok', found}
"""

# The data set's marker (redis_layout.py), set if there is none: KEYS the
# marker key; ARGV a new random id. Answers the marker now there, so of
# processes starting together on an empty Redis every one adopts the same.
# (No CHECK: this is where a process learns the marker.)
ADOPT = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

# After Redis was restored from an older copy (broker-admin redis restored):
# KEYS {p}:seq, {p}:horizon, {p}:tombs, {p}:feed; ARGV the cursor gap, the
# stream's length, the origin. The sequence jumps by the gap, so no cursor
# a client holds is handed out again; the horizon follows it, so every
# cursor handed out before is answered with a reset (a snapshot); the
# tombstones below it go, so a later trim cannot set the horizon back. An
# entry of type z at the new top tells a process still following the
# stream that its replica is of the lost data (shared_stream.py), and lets
# a process started afterwards begin there without a gap. Strings
# throughout (Lua numbers lose precision). Answers {'ok', sequence before,
# sequence now}.
RESTORED = CHECK + """
local before = redis.call('GET', KEYS[1]) or '0'
redis.call('INCRBY', KEYS[1], ARGV[1])
local top = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[2], top)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', top)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], top .. '-*', 't', 'z', 'b', before,
           'o', ARGV[3])
return {'ok', before, top}
"""

# The id of the change stream's first entry, false if it is empty (KEYS the
# stream): only the id travels, not the entry. The stream reader reads it
# with every XREAD to see entries trimmed before it read them
# (redis_follow.py). A read: no marker check (the marker is read beside it).
FIRST_ID = """
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then return first[1] end
return false
"""

#: The scripts the store runs with the marker appended (CHECK), by name.
SCRIPTS = {"change": CHANGE, "add": ADD, "remove": REMOVE, "secret": SECRET,
           "tokens": TOKENS, "heard": HEARD, "lease": LEASE, "expired": EXPIRED, "held": HELD,
           "restored": RESTORED}
