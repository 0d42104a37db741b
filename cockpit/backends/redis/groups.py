"""Event groups in Redis, shared by every cockpit process on it.

Keys (``<kind>`` is ``eco`` or ``alarm``):

- ``ckpt.group.<kind>.<id>``: the group (hash: first_time, last_time, count, state, data, reopened,
  ended_at, ended_time, acked_by, acked_at);
- ``ckpt.group.<kind>.<id>.samples``: its latest occurrences (list, newest first);
- ``ckpt.groups.<kind>`` and ``ckpt.groups.<kind>.count``: every group's id by last_time and by count
  (sorted sets), and ``ckpt.groups.<kind>.state.<state>`` and ``...state.<state>.count`` the same
  for the groups in one state; ``ckpt.groups.<kind>.ended``: the ended ones by when they ended;
- ``ckpt.group.seen.<guid>``: a day-long marker that makes a redelivered event count once.

Every change is one Lua script, so concurrent reports never split a group and a list never sees
a group half moved. The rules are those of :func:`cockpit.groups.transition`, which the embedded
backend runs; both pass the same tests.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cockpit.backends.redis.bus import RedisBus
from cockpit.backends.redis.script import Script
from cockpit.events import Event
from cockpit.groups import (PRUNE_BATCH, SEEN_TTL, DueNotice, GroupPage, GroupStore, group_cursor, occurrence,
                            parse_group_cursor, present_group, sort_field)

# The shared part of the scripts: a group's state change, and its place in the indexes.
_COMMON = """
local OPEN = {eco = 'NEW', alarm = 'firing'}
local ENDED = {CLOSED = true, resolved = true, closed = true}

local function transition(kind, state, reported, t, last, ended_time)
  if kind == 'eco' then
    if reported == 'CLOSED' then return 'CLOSED' end
    if not state then return reported end
    if state == 'CLOSED' then
      if not ended_time or t > ended_time then return 'NEW' end
      return 'CLOSED'
    end
    if reported == 'ALERT' then return 'ALERT' end
    return state
  end
  if reported == 'resolved' then
    if not state then return 'resolved' end
    if state == 'firing' and t >= last then return 'resolved' end
    return state
  end
  if not state or state == 'firing' then return 'firing' end
  if not ended_time or t > ended_time then return 'firing' end
  return state
end

-- move group `g` (id `id`, kind `kind`, index prefix `ix`) from `old` (false: new) to `new`
local function enter(g, ix, kind, id, old, new, ended_time, now)
  if old and old ~= new then
    redis.call('ZREM', ix .. '.state.' .. old, id)
    redis.call('ZREM', ix .. '.state.' .. old .. '.count', id)
  end
  redis.call('HSET', g, 'state', new)
  if ENDED[new] then
    if not (old and ENDED[old]) then
      redis.call('HSET', g, 'ended_at', now, 'ended_time', ended_time)
      redis.call('ZADD', ix .. '.ended', now, id)
    end
  elseif old then
    if ENDED[old] then
      redis.call('HINCRBY', g, 'reopened', 1)
      redis.call('ZREM', ix .. '.ended', id)
    end
    if new == OPEN[kind] then redis.call('HDEL', g, 'ended_at', 'ended_time', 'acked_by', 'acked_at') end
  end
end

-- a notice is due for group `g` now: `reason` says why (opened, reopened, resolved, repeat, ...)
local function due(g, kind, id, reason, at)
  redis.call('HSET', g, 'notice', reason)
  redis.call('ZADD', 'ckpt.notices.due', at, kind .. ':' .. id)
end

local function notice_of(old, new)
  if not old then
    if not ENDED[new] then return 'opened' end
  elseif ENDED[old] and not ENDED[new] then return 'reopened'
  elseif ENDED[new] and not ENDED[old] then return 'resolved' end
  return false
end

local function index(g, ix, id, state)
  local t, count = redis.call('HGET', g, 'last_time'), redis.call('HGET', g, 'count')
  redis.call('ZADD', ix, t, id)
  redis.call('ZADD', ix .. '.count', count, id)
  redis.call('ZADD', ix .. '.state.' .. state, t, id)
  redis.call('ZADD', ix .. '.state.' .. state .. '.count', count, id)
end
"""

# Events counted in one reactor turn share one EVALSHA. ARGV: seen ttl, samples kept, now, then
# 9 values per event: kind, id, seen marker, time, count, reported state, data, sample, ("" spare).
# (Keys travel in ARGV: a batch names keys the caller cannot list up front; one Redis, no cluster.)
_RECORD = _COMMON + """
local ttl, keep, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
for i = 4, #ARGV, 9 do
  local kind, id, seen = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local t, count, reported, data, sample = tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  if not redis.call('SET', seen, '1', 'NX', 'EX', ttl) then
    table.insert(out, 0)
  else
    local g, ix = 'ckpt.group.' .. kind .. '.' .. id, 'ckpt.groups.' .. kind
    local old = redis.call('HGET', g, 'state')
    local last = t
    local ended_time = false
    if not old then
      redis.call('HSET', g, 'id', id, 'first_time', t, 'last_time', t, 'count', count, 'data', data)
    else
      last = tonumber(redis.call('HGET', g, 'last_time'))
      ended_time = tonumber(redis.call('HGET', g, 'ended_time') or '')
      if kind == 'eco' or reported == 'firing' then redis.call('HINCRBY', g, 'count', count) end
      if t < tonumber(redis.call('HGET', g, 'first_time')) then redis.call('HSET', g, 'first_time', t) end
    end
    local new = transition(kind, old, reported, t, last, ended_time)
    if t >= last then redis.call('HSET', g, 'last_time', t, 'data', data) end
    redis.call('LPUSH', g .. '.samples', sample)
    redis.call('LTRIM', g .. '.samples', 0, keep - 1)
    if new ~= old then
      enter(g, ix, kind, id, old, new, t, now)
      local reason = notice_of(old, new)
      if reason then due(g, kind, id, reason, now) end
    end
    index(g, ix, id, new)
    table.insert(out, 1)
  end
end
return out
"""

# ARGV: kind, id, action (ack, close, reopen), who, now. Returns the group and its samples, or nil.
_ACT = _COMMON + """
local kind, id, action, by, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local g, ix = 'ckpt.group.' .. kind .. '.' .. id, 'ckpt.groups.' .. kind
local old = redis.call('HGET', g, 'state')
if not old then return nil end
if action == 'ack' then
  redis.call('HSET', g, 'acked_by', by, 'acked_at', now)
  redis.call('ZREM', 'ckpt.notices.due', kind .. ':' .. id)  -- an ack stops the repeats
elseif action == 'close' and not ENDED[old] then
  local closed = kind == 'eco' and 'CLOSED' or 'closed'
  enter(g, ix, kind, id, old, closed, redis.call('HGET', g, 'last_time'), now)
  index(g, ix, id, closed)
  redis.call('ZREM', 'ckpt.notices.due', kind .. ':' .. id)
elseif action == 'reopen' and ENDED[old] then
  enter(g, ix, kind, id, old, OPEN[kind], '', now)
  index(g, ix, id, OPEN[kind])
  due(g, kind, id, 'reopened', now)
end
return {redis.call('HGETALL', g), redis.call('LRANGE', g .. '.samples', 0, -1)}
"""

# ARGV: kind, ended before, at most. Removes the groups and their samples; returns how many.
_PRUNE = """
local kind = ARGV[1]
local ix = 'ckpt.groups.' .. kind
local ids = redis.call('ZRANGEBYSCORE', ix .. '.ended', '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local g = 'ckpt.group.' .. kind .. '.' .. id
  local state = redis.call('HGET', g, 'state')
  if state then
    redis.call('ZREM', ix .. '.state.' .. state, id)
    redis.call('ZREM', ix .. '.state.' .. state .. '.count', id)
  end
  redis.call('ZREM', ix, id)
  redis.call('ZREM', ix .. '.count', id)
  redis.call('ZREM', ix .. '.ended', id)
  redis.call('DEL', g, g .. '.samples')
  redis.call('ZREM', 'ckpt.notices.due', kind .. ':' .. id)
end
return #ids
"""

# ARGV: now, lease, at most. The notices due by now, each leased to this caller (its time moved to now + lease,
# so that a process that dies while sending leaves it to another). Returns {member, reason, group} triples.
_CLAIM = """
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', 'ckpt.notices.due', '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local kind, id = string.match(member, '^(%a+):(%x+)$')
  local g = 'ckpt.group.' .. (kind or '') .. '.' .. (id or '')
  local reason = kind and redis.call('HGET', g, 'notice')
  if reason then
    redis.call('ZADD', 'ckpt.notices.due', now + lease, member)
    table.insert(out, {member, reason, redis.call('HGETALL', g)})
  else
    redis.call('ZREM', 'ckpt.notices.due', member)
  end
end
return out
"""

# ARGV: kind, id, the reason of the notice sent (or "" when it was held back), now, repeat (seconds).
# A notice sent: an eco that was NEW is ALERT now; an open group nobody acked is due again after `repeat`.
# A notice held back (silenced) is not repeated. Either way, a newer reason set meanwhile is left due.
_NOTICED = _COMMON + """
local kind, id, sent, now, every = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local g, ix, member = 'ckpt.group.' .. kind .. '.' .. id, 'ckpt.groups.' .. kind, kind .. ':' .. id
local state = redis.call('HGET', g, 'state')
local reason = redis.call('HGET', g, 'notice')
if not state then
  redis.call('ZREM', 'ckpt.notices.due', member)
  return 0
end
if sent == '' then
  if reason == ARGV[6] then
    redis.call('HSET', g, 'notice', 'held')
    redis.call('ZREM', 'ckpt.notices.due', member)
  end
  return 1
end
redis.call('HSET', g, 'notified_at', now)
redis.call('HINCRBY', g, 'notices', 1)
if state == 'NEW' then
  enter(g, ix, kind, id, 'NEW', 'ALERT', '', now)
  index(g, ix, id, 'ALERT')
  state = 'ALERT'
end
if reason ~= sent then return 1 end
if not ENDED[state] and not redis.call('HGET', g, 'acked_by') then
  due(g, kind, id, 'repeat', now + every)
else
  redis.call('HSET', g, 'notice', 'sent')
  redis.call('ZREM', 'ckpt.notices.due', member)
end
return 1
"""

# ARGV: kind, id, reason, now. An open group gets a notice now (a silence over it ended, say).
_DUE = _COMMON + """
local kind, id = ARGV[1], ARGV[2]
local g = 'ckpt.group.' .. kind .. '.' .. id
local state = redis.call('HGET', g, 'state')
if not state or ENDED[state] then return 0 end
due(g, kind, id, ARGV[3], ARGV[4])
return 1
"""

# KEYS: the sorted set. ARGV: hash key prefix, limit, cursor score ("" from the top), cursor id.
# Ties on the score are ordered by id, as the sorted set orders them. Returns {score, hash} pairs.
_PAGE = """
local limit = tonumber(ARGV[2])
local ids
if ARGV[3] == '' then
  ids = redis.call('ZREVRANGE', KEYS[1], 0, limit)
else
  ids = {}
  local ties = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[3])
  for i = #ties, 1, -1 do
    if ties[i] < ARGV[4] and #ids <= limit then table.insert(ids, ties[i]) end
  end
  if #ids <= limit then
    local older = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], '-inf', 'LIMIT', 0, limit + 1 - #ids)
    for _, id in ipairs(older) do table.insert(ids, id) end
  end
end
local out = {}
for _, id in ipairs(ids) do
  table.insert(out, {redis.call('ZSCORE', KEYS[1], id), redis.call('HGETALL', ARGV[1] .. id)})
end
return out
"""

_SCRIPTS = {name: Script(script)
            for name, script in (("record", _RECORD), ("act", _ACT), ("prune", _PRUNE), ("page", _PAGE),
                                         ("claim", _CLAIM), ("noticed", _NOTICED), ("due", _DUE))}


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return dict(zip(flat[::2], flat[1::2]))


class RedisGroupStore(GroupStore):
    def __init__(self, bus: RedisBus, clock: IReactorTime, samples: int = 20):
        super().__init__(clock, samples)
        self.bus = bus
        self._batch: list[tuple[list[str], Deferred[bool]]] = []
        self._flush_call: Any = None

    def _run(self, name: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        return _SCRIPTS[name](self.bus, *args, keys=keys)

    def record(self, event: Event) -> Deferred[bool]:
        seen = occurrence(event)
        d: Deferred[bool] = Deferred()
        self._batch.append(([seen.kind, seen.id, f"ckpt.group.seen.{event.guid}", str(seen.time), str(seen.count),
                             seen.reported, json.dumps(seen.data), json.dumps(seen.sample), ""], d))
        if self._flush_call is None:
            self._flush_call = self.bus.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_call = None
        batch, self._batch = self._batch, []
        args = [str(SEEN_TTL), str(self.samples), repr(self.clock.seconds())]
        args += [value for values, _ in batch for value in values]

        def counted(replies: list[Any]) -> None:
            for (_, waiting), reply in zip(batch, replies):
                waiting.callback(bool(int(reply)))

        def failed(failure: Any) -> None:
            for _, waiting in batch:
                waiting.errback(failure)

        self._run("record", [], args).addCallbacks(counted, failed)

    def page(self, kind: str, limit: int, before: Optional[str], state: Optional[str] = None,
             sort: str = "last_time") -> Deferred[GroupPage]:
        try:
            bound = parse_group_cursor(before)
        except ValueError as exc:
            return defer.fail(exc)
        score, group_id = bound if bound is not None else ("", "")
        index = f"ckpt.groups.{kind}" + (f".state.{state}" if state else "")
        index += ".count" if sort_field(sort) == "count" else ""
        d = self._run("page", [index], [f"ckpt.group.{kind}.", str(limit), str(score), group_id])

        def present(replies: Optional[list[Any]]) -> GroupPage:
            found = [(score, _pairs(flat)) for score, flat in replies or [] if flat]
            chosen = found[:limit]
            after = group_cursor(chosen[-1][0], chosen[-1][1]["id"]) if len(found) > limit else None
            return [present_group(kind, group) for _, group in chosen], after

        return d.addCallback(present)

    def get(self, kind: str, group_id: str) -> Deferred[Optional[dict[str, Any]]]:
        key = f"ckpt.group.{kind}.{group_id}"
        d = self.bus.execute("HGETALL", key)

        def samples(flat: Any) -> Any:
            if not flat:
                return None
            group = _pairs(flat) if isinstance(flat, list) else flat
            return self.bus.execute("LRANGE", f"{key}.samples", "0", "-1").addCallback(
                lambda found: present_group(kind, group, found))

        return d.addCallback(samples)

    def act(self, kind: str, group_id: str, action: str, by: str) -> Deferred[Optional[dict[str, Any]]]:
        d = self._run("act", [], [kind, group_id, action, by, repr(self.clock.seconds())])
        return d.addCallback(lambda reply: present_group(kind, _pairs(reply[0]), reply[1]) if reply else None)

    def prune(self, kind: str, ended_before: float) -> Deferred[int]:
        return self._run("prune", [], [kind, repr(ended_before), str(PRUNE_BATCH)]).addCallback(int)

    # -- notices -----------------------------------------------------------------------
    def claim_notices(self, lease: float, limit: int = 100) -> Deferred[list[DueNotice]]:
        d = self._run("claim", [], [repr(self.clock.seconds()), repr(lease), str(limit)])

        def present(replies: Optional[list[Any]]) -> list[DueNotice]:
            out = []
            for member, reason, flat in replies or []:
                kind = member.partition(":")[0]
                out.append((kind, present_group(kind, _pairs(flat)), reason))
            return out

        return d.addCallback(present)

    def noticed(self, kind: str, group_id: str, reason: str, sent: bool, repeat: float) -> Deferred[None]:
        return self._run("noticed", [], [kind, group_id, reason if sent else "", repr(self.clock.seconds()),
                                         repr(repeat), reason])

    def notice_due(self, kind: str, group_id: str, reason: str) -> Deferred[bool]:
        return self._run("due", [], [kind, group_id, reason, repr(self.clock.seconds())]).addCallback(
            lambda n: bool(int(n)))
