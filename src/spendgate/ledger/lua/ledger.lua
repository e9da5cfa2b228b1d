-- spendgate's ledger on Redis: every operation is one call of this script, atomic and one round trip.
--
-- KEYS: held (hash bucket -> held amount), holds (zset id -> expires_at), buckets (hash bucket -> meta
--       JSON [limit, window_s, unit, ends_at], kept as the policy says now: the sweep prunes by it),
--       events (zset ts -> event JSON).
-- Derived from the prefix P: the alert outbox (a hash P..'alert:'..key per alert; zsets P..'alerts:due'
-- of pending keys by next_at and P..'alerts:created' of every key by created) and the audit log (a
-- list P..'audit:e:'..chain of entries, P..'audit:c:'..chain of checkpoints, a set P..'audit:chains').
-- ARGV[1] = operation, ARGV[2] = key prefix; every key shares the prefix's {hash tag}, so a Redis
-- Cluster keeps them in one slot and the keys derived from bucket names below are local to it.
-- Amounts are integers (nano-dollars, tokens); Lua numbers are doubles, exact up to 2^53 (~$9M).
-- Numbers go back to the client as strings printed with %.0f / %.17g, never tostring().

local op, P = ARGV[1], ARGV[2]
local HELD, HOLDS, BUCKETS, EVENTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function num(x)  -- an integer as Redis and the client expect it (never "-0" or "1e+15")
  if x == 0 then return '0' end
  return string.format('%.0f', x)
end
local function fnum(x) return string.format('%.17g', x) end

local function slot_of(now, win, slot_s)
  if win > 0 then return math.floor(now / slot_s) end
  return 0
end

local function first_live(now, win, slot_s)
  if win > 0 then return math.floor((now - win) / slot_s) end
  return 0
end

-- charged amount inside the window, and when its oldest counted slot leaves it (-1: never/none)
local function spent(key, now, win, slot_s)
  local all = redis.call('HGETALL', P .. 'slots:' .. key)
  local first = first_live(now, win, slot_s)
  local total, oldest = 0, nil
  for i = 1, #all, 2 do
    local slot, amount = tonumber(all[i]), tonumber(all[i + 1])
    if win == 0 or slot >= first then
      total = total + amount
      if oldest == nil or slot < oldest then oldest = slot end
    end
  end
  local frees = -1
  if win > 0 and oldest ~= nil then frees = (oldest + 1) * slot_s + win end
  return total, frees
end

local function granted(key, now)
  local gkey = P .. 'grants:' .. key
  redis.call('ZREMRANGEBYSCORE', gkey, '-inf', now)
  local total = 0
  for _, member in ipairs(redis.call('ZRANGE', gkey, 0, -1)) do
    total = total + tonumber(string.match(member, '^(%d+)'))
  end
  return total
end

local function held(key)
  return tonumber(redis.call('HGET', HELD, key) or '0')
end

local function charge(key, win, slot_s, amount, now)
  local skey = P .. 'slots:' .. key
  redis.call('HINCRBY', skey, num(slot_of(now, win, slot_s)), num(amount))
  if win > 0 then
    local first = first_live(now, win, slot_s)
    for _, field in ipairs(redis.call('HKEYS', skey)) do
      if tonumber(field) < first then redis.call('HDEL', skey, field) end
    end
  end
end

-- a hold is a hash: l = lines JSON [[key, limit, win, unit, amount, slot_s, meta], ...], e = event JSON
local function pop_hold(id)
  local hkey = P .. 'hold:' .. id
  local raw = redis.call('HMGET', hkey, 'l', 'e')
  if not raw[1] then return nil end
  redis.call('DEL', hkey)
  redis.call('ZREM', HOLDS, id)
  local lines = cjson.decode(raw[1])
  for _, l in ipairs(lines) do redis.call('HINCRBY', HELD, l[1], num(-l[5])) end
  return lines, raw[2]
end

local function expire(now)
  local out = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', HOLDS, '-inf', now)) do
    local lines, event = pop_hold(id)
    if lines then
      local usd, tokens = 0, 0
      for _, l in ipairs(lines) do
        charge(l[1], l[3], l[6], l[5], now)
        if l[4] == 'usd' and l[5] > usd then usd = l[5] end
        if l[4] == 'tokens' and l[5] > tokens then tokens = l[5] end
      end
      if event and event ~= '' then
        redis.call('ZADD', EVENTS, now, '{"expired_at":' .. fnum(now) .. ',"cost":' .. num(usd) .. ',"event":' .. event .. '}')
      end
      table.insert(out, id)
      table.insert(out, num(usd))
      table.insert(out, num(tokens))
      table.insert(out, event or '')
    end
  end
  return out
end

-- keep a bucket's listing current (a write only when it changed, so the AOF does not grow per request)
local function list_bucket(key, meta)
  if redis.call('HGET', BUCKETS, key) ~= meta then redis.call('HSET', BUCKETS, key, meta) end
end

local function is_set(x) return x ~= nil and x ~= cjson.null end

-- the outbox: an alert is written once per key, ever (until a sweep deletes it settled); `now` is the
-- client's number as text, kept exactly
local ALERT_FIELDS = {'created', 'body', 'status', 'attempts', 'next_at', 'error', 'sent_at', 'done'}
local DUE, CREATED = P .. 'alerts:due', P .. 'alerts:created'

local function add_alert(key, body, now)
  local akey = P .. 'alert:' .. key
  if redis.call('EXISTS', akey) == 1 then return end
  redis.call('HSET', akey, 'created', now, 'body', body, 'status', 'pending', 'attempts', '0', 'next_at', now,
             'error', '', 'sent_at', '', 'done', '[]', 'claimed_by', '')
  redis.call('ZADD', DUE, now, key)
  redis.call('ZADD', CREATED, now, key)
end

-- marks JSON [[key, body], ...], written unconditionally (if absent)
local function add_alerts(raw, now)
  if raw and raw ~= '' then
    for _, m in ipairs(cjson.decode(raw)) do add_alert(m[1], m[2], now) end
  end
end

-- an alert as the client parses it: key, then ALERT_FIELDS in order
local function push_alert(out, key)
  table.insert(out, key)
  for _, v in ipairs(redis.call('HMGET', P .. 'alert:' .. key, unpack(ALERT_FIELDS))) do
    table.insert(out, v or '')
  end
end

-- nothing the bucket counted can count from `cutoff` on (Bucket.ended in base.py; the first live
-- slot one earlier than the exact floor, so rounding can only keep a bucket, never drop a live one)
local function ended(key, meta, cutoff, per_window)
  local win, ends = meta[2], meta[4]
  if is_set(win) and win > 0 then
    local slot_s = math.max(1, math.floor(win / per_window))
    local first = first_live(cutoff, win, slot_s) - 1
    for _, field in ipairs(redis.call('HKEYS', P .. 'slots:' .. key)) do
      if tonumber(field) >= first then return false end
    end
    return true
  end
  return is_set(ends) and ends <= cutoff
end

-- the buckets named by any hold (a hold of amount 0 holds nothing, but its capture will charge)
local function named_by_holds()
  local busy = {}
  for _, id in ipairs(redis.call('ZRANGE', HOLDS, 0, -1)) do
    local raw = redis.call('HGET', P .. 'hold:' .. id, 'l')
    if raw then
      for _, l in ipairs(cjson.decode(raw)) do busy[l[1]] = true end
    end
  end
  return busy
end

local function state_of(l, now)
  local s, frees = spent(l[1], now, l[3], l[6])
  return s, held(l[1]), granted(l[1], now), frees
end

local function flat_states(lines, now)
  local out = {}
  for _, l in ipairs(lines) do
    local s, h, g, frees = state_of(l, now)
    table.insert(out, num(s))
    table.insert(out, num(h))
    table.insert(out, num(g))
    table.insert(out, fnum(frees))
  end
  return out
end

if op == 'authorize' then
  -- ARGV: now, ttl, hold id, lines JSON, event JSON or '', and only when a line has alert marks:
  -- marks JSON [[line index (1-based), key, body, at, on_refusal], ...] (never stored with the hold).
  -- Returns ok, 4 numbers per line, refused JSON, then the holds expired first (4 items each, as 'expire')
  local now, ttl, id = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local lines = cjson.decode(ARGV[6])
  local expired = expire(now)
  local states, refused = {}, {}
  for i, l in ipairs(lines) do
    local s, h, g, frees = state_of(l, now)
    states[i] = {s, h, g, frees}
    if l[2] >= 0 and l[5] > 0 and s + h + l[5] > l[2] + g then table.insert(refused, l[1]) end
  end
  local out = {}
  if #refused == 0 then
    redis.call('HSET', P .. 'hold:' .. id, 'l', ARGV[6], 'e', ARGV[7])
    redis.call('ZADD', HOLDS, now + ttl, id)
    for i, l in ipairs(lines) do
      redis.call('HINCRBY', HELD, l[1], num(l[5]))
      list_bucket(l[1], l[7])
      states[i][2] = states[i][2] + l[5]
    end
    table.insert(out, '1')
  else
    table.insert(out, '0')
  end
  if ARGV[8] then
    -- placed: a mark fires once spent + held reaches it; refused: the refusing buckets' on_refusal marks
    local no = {}
    for _, k in ipairs(refused) do no[k] = true end
    for _, m in ipairs(cjson.decode(ARGV[8])) do
      local st = states[m[1]]
      if #refused == 0 then
        if not m[5] and m[4] > 0 and st[1] + st[2] >= m[4] then add_alert(m[2], m[3], ARGV[3]) end
      elseif m[5] and no[lines[m[1]][1]] then
        add_alert(m[2], m[3], ARGV[3])
      end
    end
  end
  for _, st in ipairs(states) do
    table.insert(out, num(st[1]))
    table.insert(out, num(st[2]))
    table.insert(out, num(st[3]))
    table.insert(out, fnum(st[4]))
  end
  table.insert(out, cjson.encode(refused))
  for _, x in ipairs(expired) do table.insert(out, x) end
  return out

elseif op == 'capture' then
  -- ARGV: hold id, now, usd amount, tokens amount or '', event JSON or ''
  local now = tonumber(ARGV[4])
  local lines = pop_hold(ARGV[3])
  if not lines then return 0 end
  for _, l in ipairs(lines) do
    local amount = l[5]
    if l[4] == 'usd' and ARGV[5] ~= '' then amount = tonumber(ARGV[5]) end
    if l[4] == 'tokens' and ARGV[6] ~= '' then amount = tonumber(ARGV[6]) end
    charge(l[1], l[3], l[6], amount, now)
  end
  if ARGV[7] ~= '' then redis.call('ZADD', EVENTS, now, ARGV[7]) end
  return 1

elseif op == 'release' then
  -- ARGV: hold id, now, event JSON or '' (logged only when the hold was there)
  if pop_hold(ARGV[3]) then
    if ARGV[5] and ARGV[5] ~= '' then redis.call('ZADD', EVENTS, ARGV[4], ARGV[5]) end
    return 1
  end
  return 0

elseif op == 'record' then
  -- ARGV: ts, event JSON, marks JSON [[key, body], ...]
  redis.call('ZADD', EVENTS, ARGV[3], ARGV[4])
  add_alerts(ARGV[5], ARGV[3])
  return 1

elseif op == 'put_record' then
  -- ARGV: records hash, field, value, now, marks JSON [[key, body], ...]
  redis.call('HSET', ARGV[3], ARGV[4], ARGV[5])
  add_alerts(ARGV[7], ARGV[6])
  return 1

elseif op == 'claim' then
  -- ARGV: now, owner, lease end, limit: the due pending alerts, oldest (created, then key) first
  local now, owner, lease_end, limit = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
  local due = {}
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', now)) do
    local created = redis.call('ZSCORE', CREATED, key)
    if created then table.insert(due, {tonumber(created), key}) else redis.call('ZREM', DUE, key) end
  end
  table.sort(due, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  local out = {}
  for i = 1, math.min(limit, #due) do
    local key = due[i][2]
    redis.call('HSET', P .. 'alert:' .. key, 'claimed_by', owner, 'next_at', lease_end)
    redis.call('ZADD', DUE, lease_end, key)
    push_alert(out, key)
  end
  return out

elseif op == 'update_alert' then
  -- ARGV: key, owner, status, attempts, next_at, error, done JSON, sent_at or '': only the claim's owner
  local akey = P .. 'alert:' .. ARGV[3]
  local owner = redis.call('HGET', akey, 'claimed_by')
  if not owner or owner == '' or owner ~= ARGV[4] then return 0 end
  redis.call('HSET', akey, 'status', ARGV[5], 'attempts', ARGV[6], 'next_at', ARGV[7], 'error', ARGV[8],
             'done', ARGV[9], 'sent_at', ARGV[10], 'claimed_by', '')
  if ARGV[5] == 'pending' then redis.call('ZADD', DUE, ARGV[7], ARGV[3]) else redis.call('ZREM', DUE, ARGV[3]) end
  return 1

elseif op == 'alerts' then
  -- ARGV: limit (> 0): the newest alerts
  local out = {}
  for _, key in ipairs(redis.call('ZREVRANGE', CREATED, 0, tonumber(ARGV[3]) - 1)) do push_alert(out, key) end
  return out

elseif op == 'trim_alerts' then
  -- ARGV: before, batch size, offset (the old pending alerts earlier batches kept): delete the settled
  -- alerts among the next batch of the oldest created before `before`; returns {deleted, looked at}
  local keys = redis.call('ZRANGEBYSCORE', CREATED, '-inf', '(' .. ARGV[3], 'LIMIT', ARGV[5], ARGV[4])
  local deleted = 0
  for _, key in ipairs(keys) do
    local status = redis.call('HGET', P .. 'alert:' .. key, 'status')
    if status ~= 'pending' then
      redis.call('DEL', P .. 'alert:' .. key)
      redis.call('ZREM', CREATED, key)
      redis.call('ZREM', DUE, key)
      deleted = deleted + 1
    end
  end
  return {deleted, #keys}

elseif op == 'append_audit' then
  -- ARGV: chain, first seq, entries...: append when the chain holds first - 1 entries; a repeat of
  -- entries already there changes nothing; returns {1 (done) or 0 (conflict), the chain's length}
  local chain, first, n = ARGV[3], tonumber(ARGV[4]), #ARGV - 4
  local lkey = P .. 'audit:e:' .. chain
  local have = redis.call('LLEN', lkey)
  if have == first - 1 then
    for i = 5, #ARGV, 1000 do redis.call('RPUSH', lkey, unpack(ARGV, i, math.min(i + 999, #ARGV))) end
    if n > 0 then redis.call('SADD', P .. 'audit:chains', chain) end
    return {1, have}
  end
  if have < first - 1 + n then return {0, have} end
  if n == 0 then return {1, have} end
  local got = redis.call('LRANGE', lkey, first - 1, first - 2 + n)
  for i = 1, n do
    if got[i] ~= ARGV[4 + i] then return {0, have} end
  end
  return {1, have}

elseif op == 'checkpoint' then
  -- ARGV: chain, checkpoint JSON
  redis.call('RPUSH', P .. 'audit:c:' .. ARGV[3], ARGV[4])
  redis.call('SADD', P .. 'audit:chains', ARGV[3])
  return 1

elseif op == 'expire' then
  return expire(tonumber(ARGV[3]))

elseif op == 'grant' then
  -- ARGV: bucket key, amount, until, bucket meta
  local n = redis.call('HINCRBY', P .. 'seq', 'grant', 1)
  redis.call('ZADD', P .. 'grants:' .. ARGV[3], ARGV[5], ARGV[4] .. ':' .. n)
  list_bucket(ARGV[3], ARGV[6])
  return 1

elseif op == 'states' then
  -- ARGV: now, lines JSON (amounts ignored)
  return flat_states(cjson.decode(ARGV[4]), tonumber(ARGV[3]))

elseif op == 'forget' then
  -- ARGV[3..]: bucket keys to drop once nothing is held on them
  for i = 3, #ARGV do
    local key = ARGV[i]
    if held(key) == 0 then
      redis.call('DEL', P .. 'slots:' .. key, P .. 'grants:' .. key)
      redis.call('HDEL', HELD, key)
      redis.call('HDEL', BUCKETS, key)
    end
  end
  return 1

elseif op == 'prune' then
  -- ARGV: HSCAN cursor over the buckets, cutoff, batch size, slots per window.
  -- Drop the batch's buckets that ended by the cutoff with nothing held, no hold naming them and no
  -- grant live after it; returns {next cursor ('0': done), how many went}.
  local cutoff, per_window = tonumber(ARGV[4]), tonumber(ARGV[6])
  local scan = redis.call('HSCAN', BUCKETS, ARGV[3], 'COUNT', ARGV[5])
  local kv, busy, pruned = scan[2], nil, 0
  for i = 1, #kv, 2 do
    local key = kv[i]
    if held(key) == 0 and redis.call('ZCOUNT', P .. 'grants:' .. key, '(' .. ARGV[4], '+inf') == 0
        and ended(key, cjson.decode(kv[i + 1]), cutoff, per_window) then
      busy = busy or named_by_holds()
      if not busy[key] then
        redis.call('DEL', P .. 'slots:' .. key, P .. 'grants:' .. key)
        redis.call('HDEL', HELD, key)
        redis.call('HDEL', BUCKETS, key)
        pruned = pruned + 1
      end
    end
  end
  return {scan[1], num(pruned)}

elseif op == 'trim' then
  -- ARGV: before, batch size: delete up to that many of the oldest events with ts < before
  local n = math.min(redis.call('ZCOUNT', EVENTS, '-inf', '(' .. ARGV[3]), tonumber(ARGV[4]))
  if n > 0 then redis.call('ZREMRANGEBYRANK', EVENTS, 0, n - 1) end
  return n

elseif op == 'take' then
  -- ARGV: records hash, field, now: read and delete a live record in one step
  local raw = redis.call('HGET', ARGV[3], ARGV[4])
  if not raw then return false end
  redis.call('HDEL', ARGV[3], ARGV[4])
  local rec = cjson.decode(raw)
  if rec[1] ~= cjson.null and rec[1] <= tonumber(ARGV[5]) then return false end
  return raw
end

return redis.error_reply('spendgate ledger.lua: unknown operation ' .. tostring(op))
