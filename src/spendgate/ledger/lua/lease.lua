-- Budget leases: one operation spliced into ledger.lua ahead of its dispatch (see lease.py, _lease_lua),
-- so it shares ledger.lua's helpers (expire, spent, held, granted, charge, list_bucket, add_alert) and
-- runs as one EVALSHA of its own script. ledger.lua's operations are unchanged.
--
-- An instance's leases are ONE ordinary hold, P..'hold:'..id, with one line per leased bucket
-- [key, limit, win, unit, amount, slot_s, meta, done]: `amount` is the slice the instance holds on
-- the bucket now (so every other instance, status and expiry see it as held), `done` the total the
-- instance has captured into that slice and this script has charged (cumulative, so a batch sent twice
-- after a lost reply is charged once). A crashed instance stops renewing: the hold expires and
-- ledger.lua's expire() charges every line its `amount` (the slice), flagged like any expired hold.
-- P..'leases:'..key is a zset of the lease holds on a bucket (score: when each lapses), to share headroom.

if op == 'lease' then
  -- ARGV: now, ttl, hold id, expect ('1': the instance believes its hold exists), entries JSON,
  -- the hold's event JSON (logged if it expires), then event pairs (ts, event JSON) to log.
  -- entry: [key, limit (-1: none), win, unit, slot_s, meta, captured (cumulative), floor, want, need,
  --         marks [[key, body, at], ...]]
  -- The slice becomes max(floor, min(want, slice - new captures)) — never less than the local holds it
  -- covers (floor), never more than it was unless it may grow: growth is capped by want, by
  -- room / (2 × leases on the bucket), and stops below the bucket's next alert mark. When `need` > 0
  -- and the slice would stay below it, the slice drops to its floor (its free part goes back to
  -- the bucket for the per-request path to use).
  -- Returns 'ok' then 5 items per entry (slice, spent, held, granted, frees), or 'gone' (the hold
  -- expired: nothing applied), then the holds expired first (4 items each, as 'expire').
  local now, ttl, id, expect = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
  local hkey = P .. 'hold:' .. id
  -- the instance is alive: a hold of its that no one has expired yet is renewed before expiry runs
  if redis.call('ZSCORE', HOLDS, id) then redis.call('ZADD', HOLDS, now + ttl, id) end
  local expired = expire(now)
  local raw = redis.call('HGET', hkey, 'l')
  local out = {}
  if expect == '1' and not raw then
    table.insert(out, 'gone')
  else
    table.insert(out, 'ok')
    local old = {}
    if raw then
      for _, l in ipairs(cjson.decode(raw)) do old[l[1]] = l end
    end
    local parts = {}
    for _, e in ipairs(cjson.decode(ARGV[7])) do
      local key, limit, win, unit, slot_s, meta = e[1], e[2], e[3], e[4], e[5], e[6]
      local total, floor, want, need, marks = e[7], e[8], e[9], e[10], e[11]
      local l = old[key]
      old[key] = nil
      local have, done = 0, 0
      if l then
        have = l[5]
        if l[8] then done = l[8] end
      end
      local c = total - done
      if c > 0 then charge(key, win, slot_s, c, now) else c = 0 end
      local keep = math.max(floor, math.min(want, math.max(have - c, 0)))
      local s, frees = spent(key, now, win, slot_s)
      local h, g = held(key), granted(key, now)
      local others = h - have
      local new = keep
      if want > keep then
        new = want
        local lkey = P .. 'leases:' .. key
        if limit >= 0 then
          redis.call('ZREMRANGEBYSCORE', lkey, '-inf', now)
          local n = redis.call('ZCARD', lkey)
          if not redis.call('ZSCORE', lkey, id) then n = n + 1 end
          local room = limit + g - s - others
          new = math.max(keep, math.min(want, math.floor(room / (2 * n))))
        end
        local base, nxt = s + others, nil
        for _, m in ipairs(marks) do
          if m[3] > base + keep and (nxt == nil or m[3] < nxt) then nxt = m[3] end
        end
        if nxt ~= nil and base + new >= nxt then new = math.max(keep, nxt - 1 - base) end
      end
      if need > 0 and new < need then new = floor end
      for _, m in ipairs(marks) do
        if m[3] > 0 and m[3] <= s + others + new then add_alert(m[1], m[2], ARGV[3]) end
      end
      if new ~= have then redis.call('HINCRBY', HELD, key, num(new - have)) end
      local lkey = P .. 'leases:' .. key
      if new > 0 then
        -- written by hand: cjson prints numbers with 14 digits, and `done` grows past that
        table.insert(parts, '[' .. cjson.encode(key) .. ',' .. num(limit) .. ',' .. num(win) .. ',' .. cjson.encode(unit)
          .. ',' .. num(new) .. ',' .. num(slot_s) .. ',' .. cjson.encode(meta) .. ',' .. num(total) .. ']')
        redis.call('ZADD', lkey, now + ttl, id)
        list_bucket(key, meta)
      else
        redis.call('ZREM', lkey, id)
      end
      table.insert(out, num(new))
      table.insert(out, num(s))
      table.insert(out, num(others + new))
      table.insert(out, num(g))
      table.insert(out, fnum(frees))
    end
    for _, l in pairs(old) do  -- a line the instance did not name is kept as it is
      table.insert(parts, '[' .. cjson.encode(l[1]) .. ',' .. num(l[2]) .. ',' .. num(l[3]) .. ',' .. cjson.encode(l[4])
        .. ',' .. num(l[5]) .. ',' .. num(l[6]) .. ',' .. cjson.encode(l[7]) .. ',' .. num(l[8] or 0) .. ']')
    end
    for i = 9, #ARGV, 2 do redis.call('ZADD', EVENTS, ARGV[i], ARGV[i + 1]) end
    if #parts > 0 then
      redis.call('HSET', hkey, 'l', '[' .. table.concat(parts, ',') .. ']', 'e', ARGV[8])
      redis.call('ZADD', HOLDS, now + ttl, id)
    else
      redis.call('DEL', hkey)
      redis.call('ZREM', HOLDS, id)
    end
  end
  for _, x in ipairs(expired) do table.insert(out, x) end
  return out
end
