"""Heartbeats in this process's memory (the embedded backend): the Redis store's rules, step for step."""
from __future__ import annotations

from typing import Literal, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cockpit.heartbeats import DEFAULT_TIMEOUT, HeartbeatStore, Record, Work, deadline_text


class MemoryHeartbeatStore(HeartbeatStore):
    def __init__(self, clock: IReactorTime):
        super().__init__(clock)
        self.records: dict[str, dict[str, str]] = {}  # name -> fields, as the Redis hash holds them
        self.due: dict[str, float] = {}  # name -> when there is something to do: the sorted set's scores

    def _record(self, name: str, timeout: Optional[float]) -> dict[str, str]:
        record = self.records.setdefault(name, {"name": name})
        record["timeout"] = repr(timeout) if timeout is not None else record.get("timeout") or repr(DEFAULT_TIMEOUT)
        return record

    def beat(self, name: str, timeout: Optional[float], lease: float,
             in_progress: bool = False) -> Deferred[tuple[Record, Optional[Work]]]:
        now = self.clock.seconds()
        if in_progress and self.records.get(name, {}).get("error") == "1":
            return defer.succeed((Record(dict(self.records[name])), None))
        record = self._record(name, timeout)
        deadline = deadline_text(now + float(record["timeout"]))
        record.update(last_beat=repr(now), deadline=deadline, error="")
        action: Optional[Literal["fire", "resolve"]] = None
        if record.get("fired"):
            record.update(resolve=record["fired"], resolving_at=repr(now), fired="")
            action = "resolve"
        elif record.get("resolve"):
            action = "resolve"
        self.due[name] = now + lease if action else float(deadline)
        snapshot = Record(dict(record))
        return defer.succeed((snapshot, Work(action, snapshot) if action else None))

    def fail(self, name: str, timeout: Optional[float], lease: float) -> Deferred[tuple[Record, Optional[Work]]]:
        now = self.clock.seconds()
        record = self._record(name, timeout)
        record["error"] = "1"
        if record.get("fired") or record.get("resolve"):
            if not record.get("fired"):  # a resolve is owed: late from now, fired once it is out
                record["deadline"] = deadline_text(now)
            return defer.succeed((Record(dict(record)), None))
        deadline = record.get("deadline")
        if not deadline or float(deadline) > now:
            record["deadline"] = deadline_text(now)
        elif self.due.get(name, 0.0) > now:  # late already, and its alarm is being published
            return defer.succeed((Record(dict(record)), None))
        self.due[name] = now + lease
        snapshot = Record(dict(record))
        return defer.succeed((snapshot, Work("fire", snapshot)))

    def claim(self, lease: float, limit: int) -> Deferred[list[Work]]:
        now = self.clock.seconds()
        found: list[Work] = []
        action: Literal["fire", "resolve"]
        for name in sorted((name for name, when in self.due.items() if when <= now), key=self.due.__getitem__):
            if len(found) >= limit:
                break
            record = self.records.get(name)
            if record is not None and record.get("resolve"):
                action = "resolve"
            elif record is not None and not record.get("fired"):
                action = "fire"
            else:
                del self.due[name]
                continue
            self.due[name] = now + lease
            found.append(Work(action, Record(dict(record))))
        return defer.succeed(found)

    def confirm(self, work: Work) -> Deferred[bool]:
        record = self.records.get(work.record.name)
        if record is None:
            return defer.succeed(False)
        name = record["name"]
        if work.action == "fire":
            if record.get("fired"):
                return defer.succeed(False)
            if record.get("last_beat", "") == work.record.get("last_beat"):
                record.update(fired=work.key, fired_epoch=str(work.epoch))
                self.due.pop(name, None)
            else:  # a beat came while the alarm was published: its resolve is owed now
                record.update(resolve=work.key, resolving_at=record.get("last_beat", ""),
                              fired_epoch=str(work.epoch))
                self.due[name] = self.clock.seconds()
            return defer.succeed(True)
        if record.get("resolve") != work.key:
            return defer.succeed(False)
        record.update(resolve="", resolved_epoch=str(work.epoch))
        if not record.get("fired"):
            self.due[name] = float(record["deadline"])
        return defer.succeed(True)

    def page(self, limit: int, before: Optional[str]) -> Deferred[tuple[list[Record], Optional[str]]]:
        names = sorted(name for name in self.records if before is None or name > before)
        chosen = names[:limit]
        after = chosen[-1] if len(names) > limit else None
        return defer.succeed(([Record(dict(self.records[name])) for name in chosen], after))
