-- spendgate's ledger on Redis: every operation is one call of this script, atomic and one round trip.
--
-- KEYS: held (hash bucket -> held amount), holds (zset id -> expires_at), buckets (hash bucket -> meta
--       JSON [limit, window_s, unit, ends_at], kept as the policy says now: the sweep prunes by it),
--       events (zset ts -> event JSON).
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
  -- ARGV: now, ttl, hold id, lines JSON, event JSON or ''
  local now, ttl, id = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local lines = cjson.decode(ARGV[6])
  expire(now)
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
  for _, st in ipairs(states) do
    table.insert(out, num(st[1]))
    table.insert(out, num(st[2]))
    table.insert(out, num(st[3]))
    table.insert(out, fnum(st[4]))
  end
  table.insert(out, cjson.encode(refused))
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
  if pop_hold(ARGV[3]) then return 1 end
  return 0

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
