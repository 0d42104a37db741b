"""Event groups in Redis, shared by every cockpit process on it.

``ckpt.group.<kind>.<id>`` (hash), ``ckpt.groups.<kind>`` (sorted set of ids by last_time),
``ckpt.group.seen.<guid>`` (a day-long marker that makes a redelivered event count once).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred

from cockpit.backends.redis.bus import RedisBus
from cockpit.events import Event
from cockpit.groups import SEEN_TTL, GroupStore, group_cursor, group_update, parse_group_cursor, present_group


# Events counted in one reactor turn share one EVAL. ARGV: ttl, then 8 values per event:
# group hash, sorted set, seen marker, id, time, count, state ("" for none), data.
# (Keys travel in ARGV: a batch names keys the caller cannot list up front; one Redis, no cluster.)
_RECORD = """
local out = {}
for i = 2, #ARGV, 8 do
  local group, zset, seen = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local id, t, count, state, data = ARGV[i + 3], tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  if not redis.call('SET', seen, '1', 'NX', 'EX', ARGV[1]) then
    table.insert(out, 0)
  elseif redis.call('EXISTS', group) == 0 then
    redis.call('HSET', group, 'id', id, 'first_time', t, 'last_time', t, 'count', count, 'data', data)
    if state ~= '' then redis.call('HSET', group, 'state', state) end
    redis.call('ZADD', zset, t, id)
    table.insert(out, 1)
  else
    redis.call('HINCRBY', group, 'count', count)
    if t < tonumber(redis.call('HGET', group, 'first_time')) then
      redis.call('HSET', group, 'first_time', t)
    end
    if t >= tonumber(redis.call('HGET', group, 'last_time')) then
      redis.call('HSET', group, 'last_time', t, 'data', data)
      redis.call('ZADD', zset, t, id)
    end
    if state ~= '' then
      redis.call('HSET', group, 'state', state == 'CLOSED' and 'CLOSED' or 'ALERT')
    end
    table.insert(out, 1)
  end
end
return out
"""

# KEYS: sorted set. ARGV: hash key prefix, limit, cursor time ("" from the top), cursor id.
# Ties on last_time are ordered by id, as the sorted set orders them.
_RECORD_SHA = hashlib.sha1(_RECORD.encode()).hexdigest()

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
  table.insert(out, redis.call('HGETALL', ARGV[1] .. id))
end
return out
"""


class RedisGroupStore(GroupStore):
    prefix = "ckpt.group."

    def __init__(self, bus: RedisBus):
        self.bus = bus
        self._batch: list[tuple[list[str], Deferred]] = []
        self._flush_call: Any = None

    def record(self, event: Event) -> Deferred:
        kind, group_id, when, count, state, data = group_update(event)
        d: Deferred = Deferred()
        self._batch.append(([f"{self.prefix}{kind}.{group_id}", f"ckpt.groups.{kind}",
                             f"{self.prefix}seen.{event.guid}", group_id, str(when), str(count),
                             state or "", json.dumps(data)], d))
        if self._flush_call is None:
            self._flush_call = self.bus.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_call = None
        batch, self._batch = self._batch, []
        args = [value for values, _ in batch for value in values]
        d = self.bus.execute("EVALSHA", _RECORD_SHA, "0", str(SEEN_TTL), *args)
        # EVALSHA spares sending and hashing the script each time; EVAL (re)loads it when Redis lacks it
        d.addErrback(self._load_script, args)

        def counted(replies: list) -> None:
            for (_, waiting), reply in zip(batch, replies):
                waiting.callback(bool(int(reply)))

        def failed(failure: Any) -> None:
            for _, waiting in batch:
                waiting.errback(failure)

        d.addCallbacks(counted, failed)

    def _load_script(self, failure: Any, args: list[str]) -> Deferred:
        failure.trap(txredisapi.ResponseError)
        if "NOSCRIPT" not in failure.getErrorMessage():
            return failure
        return self.bus.execute("EVAL", _RECORD, "0", str(SEEN_TTL), *args)

    def page(self, kind: str, limit: int, before: Optional[str]) -> Deferred:
        try:
            bound = parse_group_cursor(before)
        except ValueError as exc:
            return defer.fail(exc)
        time, group_id = bound if bound is not None else ("", "")
        d = self.bus.execute("EVAL", _PAGE, "1", f"ckpt.groups.{kind}", f"{self.prefix}{kind}.",
                             str(limit), str(time), group_id)

        def present(replies: list) -> tuple[list[dict[str, Any]], Optional[str]]:
            groups = [dict(zip(flat[::2], flat[1::2])) for flat in replies or [] if flat]
            chosen = groups[:limit]
            after = group_cursor(chosen[-1]) if len(groups) > limit else None
            return [present_group(kind, g) for g in chosen], after

        return d.addCallback(present)
