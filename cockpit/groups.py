"""Event groups: error conditions (ecos) by fingerprint and alarms by service and method.

A repeat of a condition raises its count and ``last_time`` and makes no new group.
``EventGroups`` is fed by the bus consumer group ``groups``, so each event is counted by
one process however many share the bus; with a RedisBus the groups live in Redis (a hash
per group and a sorted set by last time, updated by one Lua script, so processes share
them), with the embedded bus in memory.

Redis names: ``ckpt.group.<kind>.<id>`` (hash), ``ckpt.groups.<kind>`` (sorted set of ids
by last_time), ``ckpt.group.seen.<guid>`` (a day-long marker that makes a redelivered
event count once).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Literal, Optional

import txredisapi
from pydantic import BaseModel, ConfigDict, Field
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cockpit.bus import Bus, Delivery, RedisBus
from cockpit.events import AlarmEvent, EcoEvent, Event

log = Logger()

GROUPS_CONSUMER = "groups"
SEEN_TTL = 86400  # seconds a counted guid is remembered


class EcoGroup(BaseModel):
    """One error condition: the latest eco's own fields, and how often and when it happened."""

    model_config = ConfigDict(extra="allow")
    id: str
    fingerprint: str
    state: Literal["NEW", "ALERT", "CLOSED"]
    occurence: int
    first_time: int
    last_time: int
    guid: str = Field(description="The latest eco's guid.")


class AlarmGroup(BaseModel):
    id: str
    service: str
    method: str
    msg: str = Field(description="The latest alarm's message.")
    count: int
    first_time: int
    last_time: int


class EcoGroupList(BaseModel):
    ecos: list[EcoGroup]
    next: Optional[str] = Field(None, description="Pass as `before` for the next page; null at the end.")


class AlarmGroupList(BaseModel):
    alarms: list[AlarmGroup]
    next: Optional[str] = Field(None, description="Pass as `before` for the next page; null at the end.")


def alarm_group_id(event: AlarmEvent) -> str:
    return hashlib.sha256(f"{event.service}\x00{event.method}".encode()).hexdigest()[:32]


def _update(event: Event) -> tuple[str, str, int, int, Optional[str], dict[str, Any]]:
    """(kind, id, time, count, state or None, latest fields) of what ``event`` adds to its group."""
    if isinstance(event, EcoEvent):
        fingerprint = event.fingerprint()
        data = event.to_dict()
        for name in ("type", "epoch", "source", "state", "occurence", "last_time", "close_time"):
            data.pop(name, None)
        data["fingerprint"] = fingerprint
        state = event.state if event.state in ("ALERT", "CLOSED") else "NEW"
        return "eco", fingerprint, event.last_time or event.epoch, max(event.occurence, 1), state, data
    assert isinstance(event, AlarmEvent)
    data = {"service": event.service, "method": event.method, "msg": event.msg}
    return "alarm", alarm_group_id(event), event.epoch, 1, None, data


def _next_state(current: Optional[str], reported: str) -> str:
    # a repeat of an open or closed condition is an alert, unless the report closes it
    if current is None:
        return reported
    return "CLOSED" if reported == "CLOSED" else "ALERT"


def _present(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    out = dict(json.loads(group["data"])) if isinstance(group.get("data"), str) else dict(group.get("data", {}))
    out["id"] = group["id"]
    out["first_time"] = int(group["first_time"])
    out["last_time"] = int(group["last_time"])
    if kind == "eco":
        out["occurence"] = int(group["count"])
        out["state"] = group["state"]
    else:
        out["count"] = int(group["count"])
    return out


def _cursor(group: dict[str, Any]) -> str:
    return f"{group['last_time']}:{group['id']}"


def _parse_cursor(before: Optional[str]) -> Optional[tuple[int, str]]:
    if not before:
        return None
    time, _, group_id = before.partition(":")
    if not time.isdigit() or not group_id:
        raise ValueError(f"before: expected the `next` of a previous page, such as 1700000000:ab12..., "
                         f"got {before!r}")
    return int(time), group_id


class GroupStore:
    """Where groups live; ``record`` counts one event, ``page`` lists newest first."""

    def record(self, event: Event) -> Deferred:
        raise NotImplementedError

    def page(self, kind: str, limit: int, before: Optional[str]) -> Deferred:
        """Fires with ``(groups, next cursor or None)``."""
        raise NotImplementedError


class MemoryGroupStore(GroupStore):
    remember = 100000  # guids kept to count a redelivered event once

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, dict[str, Any]]] = {"eco": {}, "alarm": {}}
        self.seen: "OrderedDict[str, None]" = OrderedDict()  # the latest guids counted

    def record(self, event: Event) -> Deferred:
        if event.guid in self.seen:
            return defer.succeed(False)
        self.seen[event.guid] = None
        if len(self.seen) > self.remember:
            self.seen.popitem(last=False)
        kind, group_id, when, count, state, data = _update(event)
        group = self.groups[kind].get(group_id)
        if group is None:
            self.groups[kind][group_id] = {"id": group_id, "first_time": when, "last_time": when,
                                           "count": count, "state": state, "data": data}
            return defer.succeed(True)
        group["count"] += count
        group["first_time"] = min(group["first_time"], when)
        if when >= group["last_time"]:
            group["last_time"] = when
            group["data"] = data
        if state is not None:
            group["state"] = _next_state(group["state"], state)
        return defer.succeed(True)

    def page(self, kind: str, limit: int, before: Optional[str]) -> Deferred:
        try:
            bound = _parse_cursor(before)
        except ValueError as exc:
            return defer.fail(exc)
        ordered = sorted(self.groups[kind].values(), key=lambda g: (g["last_time"], g["id"]), reverse=True)
        if bound is not None:
            ordered = [g for g in ordered if (g["last_time"], g["id"]) < bound]
        chosen = ordered[:limit]
        after = _cursor(chosen[-1]) if len(ordered) > limit else None
        return defer.succeed(([_present(kind, g) for g in chosen], after))


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
        kind, group_id, when, count, state, data = _update(event)
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
            bound = _parse_cursor(before)
        except ValueError as exc:
            return defer.fail(exc)
        time, group_id = bound if bound is not None else ("", "")
        d = self.bus.execute("EVAL", _PAGE, "1", f"ckpt.groups.{kind}", f"{self.prefix}{kind}.",
                             str(limit), str(time), group_id)

        def present(replies: list) -> tuple[list[dict[str, Any]], Optional[str]]:
            groups = [dict(zip(flat[::2], flat[1::2])) for flat in replies or [] if flat]
            chosen = groups[:limit]
            after = _cursor(chosen[-1]) if len(groups) > limit else None
            return [_present(kind, g) for g in chosen], after

        return d.addCallback(present)


class EventGroups(Service):
    """Counts eco and alarm events into groups, once per event across every process."""

    def __init__(self, bus: Bus, store: Optional[GroupStore] = None, **consumer_options: Any):
        self.bus = bus
        self.store = store or (RedisGroupStore(bus) if isinstance(bus, RedisBus) else MemoryGroupStore())
        if isinstance(bus, RedisBus):
            # counting may lag a moment: reading and recording in larger batches costs less
            consumer_options = {"concurrency": 512, "linger": 0.05, **consumer_options}
        self.consumer = bus.consumer(GROUPS_CONSUMER, self._handle, types=("eco", "alarm"), **consumer_options)

    def _handle(self, event: Event, delivery: Delivery) -> Deferred:
        return self.store.record(event)

    def startService(self) -> None:
        super().startService()
        self.consumer.startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.consumer.stopService()

    def ecos(self, limit: int = 50, before: Optional[str] = None) -> Deferred:
        """Fires with ``(eco groups, next cursor)``, most recent first."""
        return self.store.page("eco", limit, before)

    def alarms(self, limit: int = 50, before: Optional[str] = None) -> Deferred:
        return self.store.page("alarm", limit, before)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "handled": self.consumer.handled, "inflight": len(self.consumer.inflight)}
