"""Heartbeats in Redis, shared by every cockpit process on it: each deadline is acted on once.

Keys:

- ``ckpt.heartbeat.<name>``: the heartbeat (hash; its fields are those :mod:`cockpit.heartbeats` lists);
- ``ckpt.heartbeats``: every name (sorted set, all scores 0: listed by name with ZRANGEBYLEX);
- ``ckpt.heartbeats.due``: when each heartbeat next needs a look (sorted set): its deadline, now for a
  resolve owed, now + lease while a process publishes its alarm; absent while it is late and alarmed.

Every step is one Lua script, so a beat, a claim and a confirm never interleave. The rules are those
of :class:`cockpit.backends.embedded.heartbeats.MemoryHeartbeatStore`; both pass the same tests.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cockpit.backends.redis.bus import RedisBus
from cockpit.backends.redis.script import Script
from cockpit.heartbeats import DEFAULT_TIMEOUT, HeartbeatStore, Record, Work

PREFIX = "ckpt.heartbeat."
NAMES = "ckpt.heartbeats"
DUE = "ckpt.heartbeats.due"

_COMMON = """
local h = KEYS[1]
local function f(k) return redis.call('HGET', h, k) or '' end
local function timeout(given, default)
  if given ~= '' then return given end
  local kept = f('timeout')
  if kept ~= '' then return kept end
  return default
end
"""

# KEYS: hash, names, due. ARGV: name, timeout ('' keeps it), default, now, lease, in_progress (1/0).
# Returns {hash, action}: action 'resolve' when the beat owes one (leased to the caller), else ''.
_BEAT = _COMMON + """
local name, now, lease = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5])
if ARGV[6] == '1' and f('error') == '1' then return {redis.call('HGETALL', h), ''} end
local t = timeout(ARGV[2], ARGV[3])
local deadline = string.format('%.3f', now + tonumber(t))
redis.call('HSET', h, 'name', name, 'timeout', t, 'last_beat', ARGV[4], 'deadline', deadline, 'error', '')
redis.call('ZADD', KEYS[2], 0, name)
local action = ''
if f('fired') ~= '' then
  redis.call('HSET', h, 'resolve', f('fired'), 'resolving_at', ARGV[4], 'fired', '')
  action = 'resolve'
elseif f('resolve') ~= '' then
  action = 'resolve'
end
if action == 'resolve' then
  redis.call('ZADD', KEYS[3], now + lease, name)
else
  redis.call('ZADD', KEYS[3], deadline, name)
end
return {redis.call('HGETALL', h), action}
"""

# KEYS: hash, names, due. ARGV: name, timeout ('' keeps it), default, now, lease.
# Returns {hash, action}: 'fire' when the caller is to publish the firing alarm now, else ''.
_FAIL = _COMMON + """
local name, now, lease = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', h, 'name', name, 'timeout', timeout(ARGV[2], ARGV[3]), 'error', '1')
redis.call('ZADD', KEYS[2], 0, name)
if f('fired') ~= '' or f('resolve') ~= '' then
  if f('fired') == '' then redis.call('HSET', h, 'deadline', string.format('%.3f', now)) end
  return {redis.call('HGETALL', h), ''}
end
local deadline = f('deadline')
if deadline == '' or tonumber(deadline) > now then
  redis.call('HSET', h, 'deadline', string.format('%.3f', now))
elseif tonumber(redis.call('ZSCORE', KEYS[3], name) or '0') > now then
  return {redis.call('HGETALL', h), ''}
end
redis.call('ZADD', KEYS[3], now + lease, name)
return {redis.call('HGETALL', h), 'fire'}
"""

# KEYS: due. ARGV: hash key prefix, now, lease, limit. Returns {hash, action} per heartbeat leased.
_CLAIM = """
local now, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, name in ipairs(names) do
  local h = ARGV[1] .. name
  local action = ''
  if (redis.call('HGET', h, 'resolve') or '') ~= '' then
    action = 'resolve'
  elseif redis.call('EXISTS', h) == 1 and (redis.call('HGET', h, 'fired') or '') == '' then
    action = 'fire'
  end
  if action == '' then
    redis.call('ZREM', KEYS[1], name)
  else
    redis.call('ZADD', KEYS[1], now + lease, name)
    table.insert(out, {redis.call('HGETALL', h), action})
  end
end
return out
"""

# KEYS: hash, due. ARGV: name, action, key, epoch, now, the last_beat the claim saw. Returns 1 when recorded.
_CONFIRM = """
local h = KEYS[1]
local function f(k) return redis.call('HGET', h, k) or '' end
if redis.call('EXISTS', h) == 0 then return 0 end
if ARGV[2] == 'fire' then
  if f('fired') ~= '' then return 0 end
  if f('last_beat') == ARGV[6] then
    redis.call('HSET', h, 'fired', ARGV[3], 'fired_epoch', ARGV[4])
    redis.call('ZREM', KEYS[2], ARGV[1])
  else
    redis.call('HSET', h, 'resolve', ARGV[3], 'resolving_at', f('last_beat'), 'fired_epoch', ARGV[4])
    redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  end
  return 1
end
if f('resolve') ~= ARGV[3] then return 0 end
redis.call('HSET', h, 'resolve', '', 'resolved_epoch', ARGV[4])
if f('fired') == '' then redis.call('ZADD', KEYS[2], f('deadline'), ARGV[1]) end
return 1
"""

# KEYS: names. ARGV: hash key prefix, how many, after this name ('' from the first).
_PAGE = """
local start = '-'
if ARGV[3] ~= '' then start = '(' .. ARGV[3] end
local names = redis.call('ZRANGEBYLEX', KEYS[1], start, '+', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, name in ipairs(names) do table.insert(out, redis.call('HGETALL', ARGV[1] .. name)) end
return out
"""

_SCRIPTS = {name: Script(script)
            for name, script in (("beat", _BEAT), ("fail", _FAIL), ("claim", _CLAIM), ("confirm", _CONFIRM),
                                 ("page", _PAGE))}


def _record(flat: Any) -> Record:
    fields = dict(zip(flat[::2], flat[1::2])) if isinstance(flat, list) else dict(flat)
    return Record({str(k): str(v) for k, v in fields.items()})


def _leased(reply: list[Any]) -> tuple[Record, Optional[Work]]:
    record = _record(reply[0])
    return record, (Work(reply[1], record) if reply[1] else None)


class RedisHeartbeatStore(HeartbeatStore):
    def __init__(self, bus: RedisBus, clock: IReactorTime):
        super().__init__(clock)
        self.bus = bus

    def _run(self, name: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        return _SCRIPTS[name](self.bus, *args, keys=keys)

    def _now(self) -> str:
        return repr(self.clock.seconds())

    def beat(self, name: str, timeout: Optional[float], lease: float,
             in_progress: bool = False) -> Deferred[tuple[Record, Optional[Work]]]:
        args = [name, repr(timeout) if timeout is not None else "", repr(DEFAULT_TIMEOUT), self._now(), repr(lease),
                "1" if in_progress else "0"]
        return self._run("beat", [PREFIX + name, NAMES, DUE], args).addCallback(_leased)

    def fail(self, name: str, timeout: Optional[float], lease: float) -> Deferred[tuple[Record, Optional[Work]]]:
        args = [name, repr(timeout) if timeout is not None else "", repr(DEFAULT_TIMEOUT), self._now(), repr(lease)]
        return self._run("fail", [PREFIX + name, NAMES, DUE], args).addCallback(_leased)

    def claim(self, lease: float, limit: int) -> Deferred[list[Work]]:
        d = self._run("claim", [DUE], [PREFIX, self._now(), repr(lease), str(limit)])
        return d.addCallback(lambda replies: [Work(action, _record(flat)) for flat, action in replies or []])

    def confirm(self, work: Work) -> Deferred[bool]:
        name = work.record.name
        args = [name, work.action, work.key, str(work.epoch), self._now(), work.record.get("last_beat")]
        return self._run("confirm", [PREFIX + name, DUE], args).addCallback(lambda n: int(n) == 1)

    def page(self, limit: int, before: Optional[str]) -> Deferred[tuple[list[Record], Optional[str]]]:
        d = self._run("page", [NAMES], [PREFIX, str(limit + 1), before or ""])

        def chosen(found: Optional[list[Any]]) -> tuple[list[Record], Optional[str]]:
            records = [_record(flat) for flat in found or [] if flat]
            page = records[:limit]
            return page, (page[-1].name if len(records) > limit else None)

        return d.addCallback(chosen)
