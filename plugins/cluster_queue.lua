-- relay's matchmaking queue in Redis: Matchmaker's rules (relay.py), one script per move.
--
-- Every script gets the same KEYS, all in the hash slot of {mm} (Redis Cluster runs them):
--   1 {mm}:members     hash   client id -> its member record (JSON, below)
--   2 {mm}:queue       zset   waiting client ids, scored by ticket (positions: ZRANK + 1)
--   3 {mm}:index       zset   lexicographic, score 0: "interest SEP ticket SEP client" for each
--                             interest of a waiting client that is not held, and "SEP ticket SEP
--                             client" (the empty interest) for those that accept anyone
--   4 {mm}:deadlines   zset   "ticket SEP client" scored by the end of its interest timeout (ms),
--                             for waiting clients that are not held and do not accept anyone yet
--   5 {mm}:sessions    hash   session id -> session (JSON)
--   6 {mm}:blocks      hash   "identity SEP identity" -> order: the first reported the second
--   7 {mm}:blocklists  zset   lexicographic: "identity SEP order SEP identity", oldest block first
--   8 {mm}:blockers    zset   identities with blocks, scored by the order of their latest report
--   9 {mm}:users       hash   user identity -> JSON list of its clients (only where identity ~= id)
--  10 {mm}:counters    hash   ticket, order: the next queue ticket and block order
--  11 {mm}:decisions   stream every call's decisions, in the order Redis ran the calls: each node
--                             reads it and tells its own clients (field d: {"n": node, "d": [...]})
--  12 {mm}:owners      zset   lexicographic: "node SEP client" for every client (who serves it)
--  13 {mm}:epoch       string a random token set once: gone or changed, Redis lost its data
-- ARGV: now (ms, or "" for Redis TIME), interest timeout (ms), rematch cooldown (ms), max blocks,
-- max blocking identities, a random salt for session ids, the calling node, the decisions stream's
-- length (approximate), the epoch the node knows ("": unchecked), the move, the client id, then
-- the move's own arguments. A call with another epoch than Redis's changes nothing and answers
-- {"epoch": Redis's epoch, or ""}: the node then restores its clients (move "restore").
-- SEP is "\31" (unit separator): interests are printable, so it never occurs in one.
-- A member: {id, ident, ints (sorted), seq (-1: not waiting), held, since (ms), open, sid ("": none),
-- recent ({other id, ended at ms} oldest first, at most MAX_RECENT), node, last ({session id,
-- reason, by} of its last session), r (the round of the restore that last wrote it)}.
-- A script answers one JSON text: {"d": decisions, "next": the earliest interest timeout (ms, -1:
-- none), "id": their entry in {mm}:decisions, "prev": the entry before it} or {"illegal": code,
-- "message": text}; a
-- decision is ["q", id, position, size, node], ["p", session, node a, node b, identity a, identity b]
-- or ["e", session, reason, by, node a, node b, identity a, identity b, quiet] (a: the initiator, b:
-- the answerer; quiet, 1 or absent: its end was already told and recorded, by a node that decided it
-- alone while Redis was away). An illegal move changes nothing.

local M, Q, IX, DL, S, B, BL, BO, U, C = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local D, O, E = KEYS[11], KEYS[12], KEYS[13]
if ARGV[9] ~= '' then
  local epoch = redis.call('GET', E)
  if epoch ~= ARGV[9] then return cjson.encode({epoch = epoch or ''}) end
end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local TIMEOUT, COOLDOWN = tonumber(ARGV[2]), tonumber(ARGV[3])
local MAX_BLOCKS, MAX_IDENTITIES = tonumber(ARGV[4]), tonumber(ARGV[5])
local SALT, NODE, KEEP = ARGV[6], ARGV[7], ARGV[8]
local MAX_RECENT = 16
local SEP = '\31'
local out = {}
local made = 0 -- sessions made by this call (their ids: sha1(salt, n))
local cache = {}

local function illegal(code, message)
  return cjson.encode({illegal = code, message = message})
end

local function get(cid)
  local m = cache[cid]
  if m == nil then
    local v = redis.call('HGET', M, cid)
    if not v then return nil end
    m = cjson.decode(v)
    if m.recent == nil or next(m.recent) == nil then m.recent = {} end
    if next(m.ints) == nil then m.ints = {} end
    cache[cid] = m
  end
  return m
end

local function put(m)
  redis.call('HSET', M, m.id, cjson.encode(m))
end

local function pad(n)
  return string.format('%016d', n)
end

local function is_open(m)
  return #m.ints == 0 or now - m.since >= TIMEOUT
end

local function index(m)
  local tail = pad(m.seq) .. SEP .. m.id
  for _, i in ipairs(m.ints) do redis.call('ZADD', IX, 0, i .. SEP .. tail) end
  if m.open then
    redis.call('ZADD', IX, 0, SEP .. tail)
  else
    redis.call('ZADD', DL, m.since + TIMEOUT, tail)
  end
end

local function unindex(m)
  local tail = pad(m.seq) .. SEP .. m.id
  for _, i in ipairs(m.ints) do redis.call('ZREM', IX, i .. SEP .. tail) end
  redis.call('ZREM', IX, SEP .. tail)
  redis.call('ZREM', DL, tail)
end

local function blocked(a, b)
  return redis.call('HEXISTS', B, a .. SEP .. b) == 1 or redis.call('HEXISTS', B, b .. SEP .. a) == 1
end

local function cooling(m, other)
  for _, r in ipairs(m.recent) do
    if r[1] == other then return now - r[2] < COOLDOWN end
  end
  return false
end

-- The longest-waiting client under one prefix of the index for m: the first one that is not m, not
-- blocked and not cooling goes to fresh (and the scan stops); the first cooling one to cool.
local function scan(prefix, m, fresh, cool)
  local first, last = '[' .. prefix, '[' .. prefix .. '\255'
  local offset, found_cool = 0, false
  while true do
    local batch = redis.call('ZRANGEBYLEX', IX, first, last, 'LIMIT', offset, 32)
    if #batch == 0 then return end
    for _, e in ipairs(batch) do
      local seq, cid = string.match(string.sub(e, #prefix + 1), '^(%d+)\31(.*)$')
      if cid ~= m.id then
        local o = get(cid)
        if o and not blocked(m.ident, o.ident) then
          if cooling(m, cid) then
            if not found_cool then
              found_cool = true
              cool[#cool + 1] = {tonumber(seq), o}
            end
          else
            fresh[#fresh + 1] = {tonumber(seq), o}
            return
          end
        end
      end
    end
    offset = offset + #batch
  end
end

local function find(m)
  local fresh, cool = {}, {}
  for _, i in ipairs(m.ints) do scan(i .. SEP, m, fresh, cool) end
  if m.open then scan(SEP, m, fresh, cool) end
  local pool = fresh
  if #pool == 0 then pool = cool end
  local best = nil
  for _, c in ipairs(pool) do
    if best == nil or c[1] < best[1] then best = c end
  end
  return best and best[2]
end

local function dequeue(m)
  redis.call('ZREM', Q, m.id)
  if not m.held then unindex(m) end
  m.seq, m.open, m.held = -1, false, false
end

local function pair(a, b)
  if b.seq >= 0 and (a.seq < 0 or b.seq < a.seq) then a, b = b, a end
  for _, m in ipairs({a, b}) do
    if m.seq >= 0 then dequeue(m) end
  end
  local sid = string.sub(redis.sha1hex(SALT .. ':' .. made), 1, 16)
  made = made + 1
  local mine, shared = {}, {}
  for _, i in ipairs(a.ints) do mine[i] = true end
  for _, i in ipairs(b.ints) do
    if mine[i] then shared[#shared + 1] = i end
  end
  table.sort(shared)
  local session = {id = sid, a = a.id, b = b.id, ints = shared, t = now, w = {now - a.since, now - b.since}}
  redis.call('HSET', S, sid, cjson.encode(session))
  a.sid, b.sid = sid, sid
  put(a)
  put(b)
  out[#out + 1] = {'p', session, a.node, b.node, a.ident, b.ident}
end

local function enter(m)
  m.since = now
  m.open = is_open(m)
  local partner = find(m)
  if partner then return pair(partner, m) end
  m.seq = redis.call('HINCRBY', C, 'ticket', 1) - 1
  redis.call('ZADD', Q, m.seq, m.id)
  index(m)
  put(m)
  local size = redis.call('ZCARD', Q)
  out[#out + 1] = {'q', m.id, size, size, m.node}
end

local function update(m, wanted)
  unindex(m)
  m.ints = wanted
  m.open = is_open(m)
  index(m)
  put(m)
  local partner = find(m)
  if partner then return pair(partner, m) end
  out[#out + 1] = {'q', m.id, redis.call('ZRANK', Q, m.id) + 1, redis.call('ZCARD', Q), m.node}
end

local function finish(sid, reason, by, quiet)
  local v = redis.call('HGET', S, sid)
  if not v then return end
  local session = cjson.decode(v)
  redis.call('HDEL', S, sid)
  local e = {'e', session, reason, by, '', '', session.a, session.b}
  for k, pr in ipairs({{session.a, session.b}, {session.b, session.a}}) do
    local m, other = get(pr[1]), pr[2]
    if m then
      e[4 + k], e[6 + k] = m.node, m.ident
      if m.sid == sid then m.sid = '' end
      m.last = {sid, reason, by} -- (a restore of the other side, late, tells its node how it ended)
      local recent = {}
      for _, r in ipairs(m.recent) do
        if r[1] ~= other then recent[#recent + 1] = r end
      end
      recent[#recent + 1] = {other, now}
      if #recent > MAX_RECENT then table.remove(recent, 1) end
      m.recent = recent
      put(m)
    end
  end
  if quiet then e[9] = 1 end
  out[#out + 1] = e
end

local function join(m, wanted)
  if m.seq < 0 then
    m.ints = wanted
    return enter(m)
  end
  return update(m, wanted)
end

local function leave(m, reason)
  if m.sid ~= '' then return finish(m.sid, reason, m.id) end
  if m.seq >= 0 then
    dequeue(m)
    put(m)
  end
end

-- Forget every block of identity a (its list, and its place among the blockers); returns whom it had blocked.
local function drop_blocks(a)
  local gone = {}
  local entries = redis.call('ZRANGEBYLEX', BL, '[' .. a .. SEP, '[' .. a .. SEP .. '\255')
  for _, e in ipairs(entries) do
    local b = string.match(string.sub(e, #a + 2), '^%d+\31(.*)$')
    redis.call('HDEL', B, a .. SEP .. b)
    gone[#gone + 1] = b
  end
  if #entries > 0 then redis.call('ZREM', BL, unpack(entries)) end
  redis.call('ZREM', BO, a)
  return gone
end

-- a blocks b (a block already there keeps its age) and a becomes the newest blocker; the bounds
-- forget the oldest blocks: (identity, identity) pairs whose block is gone go to forgotten, as in
-- Matchmaker.report.
local function block(a, b, forgotten)
  local key = a .. SEP .. b
  local order = redis.call('HINCRBY', C, 'order', 1)
  if redis.call('HEXISTS', B, key) == 0 then
    redis.call('HSET', B, key, order)
    redis.call('ZADD', BL, 0, a .. SEP .. pad(order) .. SEP .. b)
    local first, last = '[' .. a .. SEP, '[' .. a .. SEP .. '\255'
    if redis.call('ZLEXCOUNT', BL, first, last) > MAX_BLOCKS then
      local oldest = redis.call('ZRANGEBYLEX', BL, first, last, 'LIMIT', 0, 1)[1]
      local gone = string.match(string.sub(oldest, #a + 2), '^%d+\31(.*)$')
      redis.call('ZREM', BL, oldest)
      redis.call('HDEL', B, a .. SEP .. gone)
      forgotten[#forgotten + 1] = a
      forgotten[#forgotten + 1] = gone
    end
  end
  redis.call('ZADD', BO, order, a)
  if redis.call('ZCARD', BO) > MAX_IDENTITIES then
    local oldest = redis.call('ZRANGE', BO, 0, 0)[1]
    forgotten[#forgotten + 1] = oldest
    for _, g in ipairs(drop_blocks(oldest)) do forgotten[#forgotten + 1] = g end
  end
end

local function clients_of(identity)
  local v = redis.call('HGET', U, identity)
  if v then return cjson.decode(v) end
  return {identity}
end

local function parse_ints(text)
  local wanted = cjson.decode(text)
  if next(wanted) == nil then return {} end
  table.sort(wanted)
  return wanted
end

local function decided()
  local answer = {d = out}
  if #out > 0 then
    local prev = redis.call('XREVRANGE', D, '+', '-', 'COUNT', 1)[1]
    answer.prev = prev and prev[1] or '0-0' -- the entry before this one: a caller that read up to it
    answer.id = redis.call('XADD', D, 'MAXLEN', '~', KEEP, '*', 'd', cjson.encode({n = NODE, d = out}))
  end
  local first = redis.call('ZRANGE', DL, 0, 0, 'WITHSCORES')
  answer.next = tonumber(first[2]) or -1 -- the first interest timeout to tick at
  return cjson.encode(answer)
end

-- Forget a client: its session ends (reason), it leaves the queue, its own blocks and its place
-- among its user's clients go.
local function forget(m, reason)
  leave(m, reason)
  redis.call('HDEL', M, m.id)
  redis.call('ZREM', O, m.node .. SEP .. m.id)
  cache[m.id] = nil
  if m.ident == m.id then
    drop_blocks(m.id)
  else
    local list, kept = cjson.decode(redis.call('HGET', U, m.ident)), {}
    for _, c in ipairs(list) do
      if c ~= m.id then kept[#kept + 1] = c end
    end
    if #kept == 0 then redis.call('HDEL', U, m.ident) else redis.call('HSET', U, m.ident, cjson.encode(kept)) end
  end
end

-- Member m is served by node from now on.
local function own(m, node)
  redis.call('ZREM', O, m.node .. SEP .. m.id)
  m.node = node
  redis.call('ZADD', O, 0, node .. SEP .. m.id)
end

-- A new member (idle), among its user's clients and its node's.
local function register(id, ident, node)
  local m = {id = id, ident = ident, ints = {}, seq = -1, held = false, since = 0, open = false, sid = '', recent = {}, node = node}
  put(m)
  cache[id] = m
  if ident ~= id then
    local list = {}
    local v = redis.call('HGET', U, ident)
    if v then list = cjson.decode(v) end
    list[#list + 1] = id
    redis.call('HSET', U, ident, cjson.encode(list))
  end
  redis.call('ZADD', O, 0, node .. SEP .. id)
  return m
end

-- Restore one of the calling node's clients as that node has it: c = {id, ident, ints, r (the
-- restore's round), q = {waited (ms), held} and last (the id of the last session the node saw it
-- in, or "") if it waits, s = session and p = {peer id, identity, node}, fresh (made while Redis
-- was away) if it is in one}. lost: Redis lost its data (a new epoch). Whatever Redis had for the
-- client gives way, but for a session the node never heard of, of a client it has waiting (not
-- held), with another node's client still in it: Redis made it while the node was away, or before
-- the node saw the primary move; it stays, and its decision goes to kept (the node tells its
-- side), if it is older than the restore (made before its first call, ms before). A session
-- Redis no longer has is made again if Redis lost it or the node made it alone,
-- else it ended meanwhile: {its id, reason, by} goes to gone.
local function restore(c, lost, before, gone, kept)
  local m = get(c.id) or register(c.id, c.ident, NODE)
  if m.node ~= NODE then
    redis.call('ZREM', O, m.node .. SEP .. m.id)
    m.node = NODE
    redis.call('ZADD', O, 0, NODE .. SEP .. m.id)
  end
  if c.q and not c.q.held and m.sid ~= '' and m.sid ~= c.last then
    local v = redis.call('HGET', S, m.sid)
    local s = v and cjson.decode(v)
    local p = s and get(s.a == m.id and s.b or s.a)
    if p and p.sid == m.sid and p.node ~= NODE and s.t < before then
      m.ints = parse_ints(cjson.encode(c.ints))
      m.r = c.r
      put(m)
      local a, b = m, p
      if s.a ~= m.id then a, b = p, m end
      kept[#kept + 1] = {'p', s, a.node, b.node, a.ident, b.ident}
      return
    end
  end
  if m.seq >= 0 then dequeue(m) end
  local want = c.s and c.s.id or ''
  if m.sid ~= '' and m.sid ~= want then finish(m.sid, 'disconnected', m.id) end
  m.ints = parse_ints(cjson.encode(c.ints))
  m.r = c.r
  if c.s then
    m.sid = want
    put(m)
    if redis.call('HEXISTS', S, want) == 0 then
      if not (lost or c.fresh) then
        local last = m.last or {}
        if last[1] == want then gone[#gone + 1] = last else gone[#gone + 1] = {want, 'left', c.p[1]} end
        m.sid = ''
        put(m)
      else
        redis.call('HSET', S, want, cjson.encode(c.s))
        local pid, pident, pnode = c.p[1], c.p[2], c.p[3]
        local p = get(pid)
        if p == nil and redis.call('HGET', C, 'restored:' .. pnode) ~= ARGV[9] then
          p = register(pid, pident, pnode) -- its node restores it, or its reaper forgets it
          p.sid = want
          put(p)
        elseif p == nil or p.sid ~= want then
          finish(want, 'disconnected', pid) -- the peer is gone, or went on, while Redis was away
        end
      end
    end
  elseif c.q then
    m.since = now - c.q.waited
    m.open = is_open(m)
    m.held = false
    local partner = (not c.q.held) and find(m)
    if partner then return pair(partner, m) end
    m.seq = redis.call('HINCRBY', C, 'ticket', 1) - 1
    redis.call('ZADD', Q, m.seq, m.id)
    m.held = c.q.held
    if not m.held then index(m) end
    put(m)
    local size = redis.call('ZCARD', Q)
    out[#out + 1] = {'q', m.id, redis.call('ZRANK', Q, m.id) + 1, size, m.node}
  else
    put(m)
  end
end

local move = ARGV[10]
local cid = ARGV[11]

if move == 'connect' then
  local known = get(cid)
  if known and known.node == ARGV[13] then return cjson.encode({d = {}}) end -- a restore told Redis first
  if known then return illegal('connected', 'client is already connected') end
  register(cid, ARGV[12], ARGV[13])
  return cjson.encode({d = {}})
end

if move == 'reap' then
  -- node ARGV[12] is dead: forget up to 100 of its clients (their peers are told); answers how many are left
  local dead = ARGV[12]
  local first, last = '[' .. dead .. SEP, '[' .. dead .. SEP .. '\255'
  for _, e in ipairs(redis.call('ZRANGEBYLEX', O, first, last, 'LIMIT', 0, 100)) do
    local m = get(string.sub(e, #dead + 2))
    if m then forget(m, 'disconnected') else redis.call('ZREM', O, e) end
  end
  decided()
  return cjson.encode({d = {}, left = redis.call('ZLEXCOUNT', O, first, last)})
end

if move == 'adopt' then
  -- node ARGV[12] is dead: the calling node serves up to 100 of its clients from now on (away:
  -- a waiting one is held, keeping its place). Answers them, taken = {{id, ident, queued (its
  -- position, or false), s = session, p = {peer id, identity, node}}}, and how many are left.
  local dead = ARGV[12]
  local first, last = '[' .. dead .. SEP, '[' .. dead .. SEP .. '\255'
  local taken = {}
  for _, e in ipairs(redis.call('ZRANGEBYLEX', O, first, last, 'LIMIT', 0, 100)) do
    redis.call('ZREM', O, e)
    local m = get(string.sub(e, #dead + 2))
    if m then
      own(m, NODE)
      if m.seq >= 0 and not m.held then
        unindex(m)
        m.held = true
      end
      put(m)
      local t = {id = m.id, ident = m.ident, queued = m.seq >= 0 and redis.call('ZRANK', Q, m.id) + 1}
      local v = m.sid ~= '' and redis.call('HGET', S, m.sid)
      if v then
        t.s = cjson.decode(v)
        local other = get(t.s.a == m.id and t.s.b or t.s.a)
        if other then t.p = {other.id, other.ident, other.node} end
      end
      taken[#taken + 1] = t
    end
  end
  return cjson.encode({d = {}, taken = taken, left = redis.call('ZLEXCOUNT', O, first, last)})
end

if move == 'tick' then
  local due = redis.call('ZRANGEBYSCORE', DL, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1000)
  for k = 1, #due, 2 do
    local seq, id = string.match(due[k], '^(%d+)\31(.*)$')
    redis.call('ZREM', DL, due[k])
    local m = get(id)
    if m and m.seq == tonumber(seq) and not m.open and not m.held then
      m.open = true
      redis.call('ZADD', IX, 0, SEP .. due[k])
      put(m)
      local partner = find(m)
      if partner then pair(partner, m) end
    end
  end
  return decided()
end

if move == 'restore' then
  -- ARGV[12]: {first (the first call of this restore), lost, ended = {{session id, reason, by}} (ended by the node alone: quiet), blocks =
  -- {{identity, identity}} (reports made meanwhile), c = {clients}, before (the calls after the
  -- first: its time, ms)}. Answers also gone, kept and t (this call's time, ms).
  local r = cjson.decode(ARGV[12])
  if r.first then redis.call('HDEL', C, 'restored:' .. NODE) end -- (its peers wait for all its clients)
  for _, e in ipairs(r.ended) do finish(e[1], e[2], e[3], true) end
  for _, pr in ipairs(r.blocks) do
    local forgotten = {}
    block(pr[1], pr[2], forgotten)
    block(pr[2], pr[1], forgotten)
  end
  local gone, kept = {}, {}
  for _, c in ipairs(r.c) do restore(c, r.lost, r.before or now + 1, gone, kept) end
  if #out == 0 then out[1] = {'r'} end -- an entry always: the node reads on from it
  local answer = cjson.decode(decided())
  answer.gone, answer.kept, answer.t = gone, kept, now
  return cjson.encode(answer)
end

if move == 'restored' then
  -- the node has restored all its clients (round ARGV[12]): forget up to 200 of the others Redis
  -- still has for it (gone while Redis was away), after ARGV[13]; answers the last one seen
  local first, last = '(' .. NODE .. SEP .. ARGV[13], '[' .. NODE .. SEP .. '\255'
  if ARGV[13] == '' then first = '[' .. NODE .. SEP end
  local seen = ''
  for _, e in ipairs(redis.call('ZRANGEBYLEX', O, first, last, 'LIMIT', 0, 200)) do
    seen = string.sub(e, #NODE + 2)
    local m = get(seen)
    if m and m.r ~= ARGV[12] then forget(m, 'disconnected') end
  end
  if seen == '' then redis.call('HSET', C, 'restored:' .. NODE, ARGV[9]) end
  decided()
  return cjson.encode({d = {}, seen = seen})
end

local m = get(cid)
if not m then return illegal('unknown', 'unknown client') end

if move == 'join' then
  if m.sid ~= '' then return illegal('already_matched', 'already in a session: send next or leave first') end
  if m.seq >= 0 and m.held then return illegal('bad_message', 'a held client cannot change its interests') end
  join(m, parse_ints(ARGV[12]))
elseif move == 'next' then
  if m.sid == '' and m.seq >= 0 and m.held then
    return illegal('bad_message', 'a held client cannot change its interests')
  end
  if m.sid ~= '' then finish(m.sid, 'next', m.id) end
  join(m, m.ints)
elseif move == 'leave' then
  leave(m, ARGV[12])
elseif move == 'disconnect' then
  if m.node ~= NODE then return cjson.encode({d = {}}) end -- served elsewhere now (a reaped node woke up)
  forget(m, ARGV[12])
elseif move == 'report' then
  if m.sid == '' then return illegal('not_matched', 'no session to report') end
  local session = cjson.decode(redis.call('HGET', S, m.sid))
  local other = get(session.a == cid and session.b or session.a)
  local forgotten = {}
  if other then -- (else: gone while Redis was away, and not restored yet)
    block(m.ident, other.ident, forgotten)
    block(other.ident, m.ident, forgotten)
  end
  finish(m.sid, 'reported', cid)
  for _, identity in ipairs(forgotten) do
    for _, id in ipairs(clients_of(identity)) do
      local w = get(id)
      if w and w.seq >= 0 and not w.held and w.ident == identity then
        local partner = find(w)
        if partner then pair(partner, w) end
      end
    end
  end
elseif move == 'hold' then
  if m.seq >= 0 and not m.held then
    unindex(m)
    m.held = true
    put(m)
  end
elseif move == 'release' then
  if m.held then
    m.held = false
    m.open = is_open(m)
    index(m)
    put(m)
    local partner = find(m)
    if partner then pair(partner, m) end
  end
elseif move == 'move' then
  -- the client is now served by node ARGV[12] (a resume or a handover)
  own(m, ARGV[12])
  put(m)
else
  return illegal('unknown', 'unknown move')
end
return decided()
