"""The embedded bus: the Redis bus's interface and semantics, inside this process only."""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generator, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit.bus import (DEAD_LETTER_STREAM, Bus, ClaimedEntry, Consumer, Handler, ReadEntry, mark_key, entry_order,
                         parse_before, stream_key)
from cockpit.events import EVENT_TYPES, Event, from_stored

log = Logger()

@dataclass
class _Pending:
    consumer: str
    deliveries: int
    since: float


@dataclass
class _Group:
    position: int = 0  # index into the stream's entries of the next undelivered one
    pending: "OrderedDict[str, _Pending]" = field(default_factory=OrderedDict)


class _Stream:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []
        self.index: dict[str, str] = {}
        self.trimmed = 0  # entries dropped from the front, so group positions stay valid
        self.groups: dict[str, _Group] = {}


class MemoryBus(Bus):
    """The embedded bus: the same interface and semantics, inside this process only."""

    kind = "memory"
    # marks kept at most; past that the oldest are forgotten early (a mark guards against a
    # repeat, and what a forgotten one lets through still carries its guid)
    max_marks = 100000

    def __init__(self, stream_maxlen: int = 100000, max_deliveries: int = 5,
                 claim_idle: float = 60.0, *, clock: IReactorTime):
        super().__init__(stream_maxlen, max_deliveries, claim_idle, clock=clock)
        self.streams: dict[str, _Stream] = {}
        self._last_id = (0, 0)
        self._waiters: list[Deferred[None]] = []
        self._marks: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (value, expires), oldest first

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        log.info("bus: embedded, in this process only; events do not leave it "
                 "and do not survive a restart (set [redis] for that)")

    def _stream(self, key: str) -> _Stream:
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = _Stream()
        return stream

    def _next_id(self) -> str:
        ms = int(self.clock.seconds() * 1000)
        last_ms, last_seq = self._last_id
        self._last_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"

    def add(self, key: str, raw: str) -> str:
        stream = self._stream(key)
        entry_id = self._next_id()
        stream.entries.append((entry_id, raw))
        stream.index[entry_id] = raw
        overflow = len(stream.entries) - self.stream_maxlen
        if overflow > 0:
            for old_id, _ in stream.entries[:overflow]:
                del stream.index[old_id]
                for group in stream.groups.values():
                    group.pending.pop(old_id, None)
            del stream.entries[:overflow]
            stream.trimmed += overflow
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return entry_id

    def publish(self, event: Event) -> Deferred[str]:
        raw = self.stamp(event).to_json().decode()
        entry_id = self.add(stream_key(event.type), raw)
        self._deliver_live(event)
        self._stored(None, event)
        return defer.succeed(entry_id)

    def consumer(self, group: str, handler: Handler, types: Sequence[str] = EVENT_TYPES,
                 name: Optional[str] = None, **options: Any) -> MemoryConsumer:
        return MemoryConsumer(self, group, handler, types, name, **options)

    def recent(self, event_type: Optional[str] = None, limit: int = 50,
               before: Optional[str] = None) -> Deferred[list[tuple[str, Event]]]:
        types = [event_type] if event_type else list(EVENT_TYPES)
        try:
            bound = parse_before(before)
        except ValueError as exc:
            return defer.fail(exc)
        entries: list[tuple[str, Event]] = []
        for t in types:
            taken = 0
            for entry_id, raw in reversed(self._stream(stream_key(t)).entries):
                if bound is not None and entry_order(entry_id, t) >= bound:
                    continue
                entries.append((entry_id, from_stored(raw)))
                taken += 1
                if taken >= limit:
                    break
        entries.sort(key=lambda item: entry_order(item[0], item[1].type), reverse=True)
        return defer.succeed(entries[:limit])

    def dead_letters(self, limit: int = 50) -> Deferred[list[tuple[str, dict[str, str]]]]:
        entries = self._stream(DEAD_LETTER_STREAM).entries[-limit:]
        return defer.succeed([(entry_id, json.loads(raw)) for entry_id, raw in reversed(entries)])

    def pending(self, group: str, types: Sequence[str] = EVENT_TYPES) -> Deferred[int]:
        return defer.succeed(sum(len(self._stream(stream_key(t)).groups[group].pending)
                                 for t in types if group in self._stream(stream_key(t)).groups))

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "ok": True, "state": "embedded", "live": True}

    def remember(self, key: str, value: str, ttl: float) -> Deferred[bool]:
        mark_key(key)
        now = self.clock.seconds()
        marks = self._marks
        # oldest first: what has expired is mostly at the front, so this costs what it drops
        while marks:
            oldest, (_, expires) = next(iter(marks.items()))
            if expires > now:
                break
            del marks[oldest]
        held = marks.get(key)
        if held is not None and held[1] > now:
            return defer.succeed(False)
        marks.pop(key, None)
        marks[key] = (value, now + ttl)
        while len(marks) > self.max_marks:
            marks.popitem(last=False)
        return defer.succeed(True)

    def recall(self, key: str) -> Deferred[Optional[str]]:
        held = self._marks.get(mark_key(key))
        if held is None:
            return defer.succeed(None)
        if held[1] <= self.clock.seconds():
            del self._marks[key]
            return defer.succeed(None)
        return defer.succeed(held[0])

    def forget(self, key: str) -> Deferred[bool]:
        held = self._marks.pop(mark_key(key), None)
        return defer.succeed(held is not None and held[1] > self.clock.seconds())

    def wait_for_entries(self) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        return d


class MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, *args: Any, **kwargs: Any):
        super().__init__(bus, *args, **kwargs)
        self.bus: MemoryBus = bus
        self._waiting: Optional[Deferred[None]] = None

    def _groups(self) -> list[tuple[str, _Stream, _Group]]:
        return [(key, self.bus._stream(key), self.bus._stream(key).groups.setdefault(self.group, _Group()))
                for key in self.streams]

    def _prepare(self) -> Deferred[None]:
        self._groups()
        return defer.succeed(None)

    @inlineCallbacks
    def _read(self, count: int) -> Generator[Deferred[None], None, list[ReadEntry]]:
        while True:
            entries: list[ReadEntry] = []
            now = self.bus.clock.seconds()
            for key, stream, group in self._groups():
                start = max(group.position - stream.trimmed, 0)
                chunk = stream.entries[start:start + count - len(entries)]
                for entry_id, raw in chunk:
                    group.pending[entry_id] = _Pending(self.consumer_name, 1, now)
                    entries.append((key, entry_id, raw))
                group.position = stream.trimmed + start + len(chunk)
                if len(entries) >= count:
                    break
            if entries:
                return entries
            self._waiting = self.bus.wait_for_entries()
            yield self._waiting
            self._waiting = None

    def _interrupt_read(self) -> Deferred[None]:
        if self._waiting is not None:
            self._waiting.cancel()
        return defer.succeed(None)

    def _stop_reading(self) -> Deferred[None]:
        return defer.succeed(None)

    def _leave(self) -> Deferred[int]:
        # one process: no heartbeat to end, and no one else to leave entries to
        return defer.succeed(0)

    def _ack(self, stream: str, entry_id: str) -> Deferred[int]:
        group = self.bus._stream(stream).groups.get(self.group)
        if group is not None:
            group.pending.pop(entry_id, None)
        return defer.succeed(1)

    def _touch(self, keys: list[tuple[str, str]]) -> Deferred[None]:
        now = self.bus.clock.seconds()
        for stream, entry_id in keys:
            pending = self.bus._stream(stream).groups[self.group].pending.get(entry_id)
            if pending is not None and pending.consumer == self.consumer_name:
                pending.since = now
        return defer.succeed(None)

    def _claim(self, min_idle: float) -> Deferred[list[ClaimedEntry]]:
        now = self.bus.clock.seconds()
        claimed: list[ClaimedEntry] = []
        for key, stream, group in self._groups():
            for entry_id, pending in list(group.pending.items()):
                if now - pending.since < min_idle:
                    continue
                pending.consumer, pending.since = self.consumer_name, now
                pending.deliveries += 1
                claimed.append((key, entry_id, stream.index.get(entry_id), pending.deliveries))
        return defer.succeed(claimed)

    def _dead_letter(self, stream: str, entry_id: str, raw: str, deliveries: int, error: str) -> Deferred[int]:
        fields = self._dead_letter_fields(stream, entry_id, raw, deliveries, error)
        self.bus.add(DEAD_LETTER_STREAM, json.dumps(dict(zip(fields[::2], fields[1::2]))))
        return self._ack(stream, entry_id)
