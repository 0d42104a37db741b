"""Event groups in this process's memory (the embedded backend)."""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cockpit.events import Event
from cockpit.groups import (ENDED, OPEN, PRUNE_BATCH, GroupStore, group_cursor, occurrence, parse_group_cursor,
                            present_group, sort_field, transition)


class MemoryGroupStore(GroupStore):
    remember = 100000  # guids kept to count a redelivered event once

    def __init__(self, clock: IReactorTime, samples: int = 20):
        super().__init__(clock, samples)
        self.groups: dict[str, dict[str, dict[str, Any]]] = {"eco": {}, "alarm": {}}
        self.seen: "OrderedDict[str, None]" = OrderedDict()  # the latest guids counted

    def record(self, event: Event) -> Deferred:
        if event.guid in self.seen:
            return defer.succeed(False)
        self.seen[event.guid] = None
        if len(self.seen) > self.remember:
            self.seen.popitem(last=False)
        seen = occurrence(event)
        group = self.groups[seen.kind].get(seen.id)
        if group is None:
            group = self.groups[seen.kind][seen.id] = {
                "id": seen.id, "first_time": seen.time, "last_time": seen.time, "count": seen.count,
                "state": None, "data": seen.data, "samples": deque(maxlen=self.samples), "reopened": 0}
            old = None
        else:
            old = group["state"]
            if seen.kind == "eco" or seen.reported == "firing":
                group["count"] += seen.count
            group["first_time"] = min(group["first_time"], seen.time)
        new = transition(seen.kind, old, seen.reported, seen.time, group["last_time"], group.get("ended_time"))
        if seen.time >= group["last_time"]:
            group["last_time"] = seen.time
            group["data"] = seen.data
        group["samples"].appendleft(seen.sample)
        if new != old:
            self._enter(seen.kind, group, new, seen.time)
        return defer.succeed(True)

    def _enter(self, kind: str, group: dict[str, Any], state: str, ended_time: int) -> None:
        old, group["state"] = group["state"], state
        if state in ENDED[kind]:
            if old not in ENDED[kind]:
                group["ended_at"] = self.clock.seconds()
                group["ended_time"] = ended_time
        elif old is not None:
            if old in ENDED[kind]:
                group["reopened"] += 1
            if state == OPEN[kind]:
                for name in ("ended_at", "ended_time", "acked_by", "acked_at"):
                    group.pop(name, None)

    def page(self, kind: str, limit: int, before: Optional[str], state: Optional[str] = None,
             sort: str = "last_time") -> Deferred:
        try:
            bound = parse_group_cursor(before)
        except ValueError as exc:
            return defer.fail(exc)
        field = sort_field(sort)
        chosen = [g for g in self.groups[kind].values() if state is None or g["state"] == state]
        ordered = sorted(chosen, key=lambda g: (g[field], g["id"]), reverse=True)
        if bound is not None:
            ordered = [g for g in ordered if (g[field], g["id"]) < bound]
        page = ordered[:limit]
        after = group_cursor(page[-1][field], page[-1]["id"]) if len(ordered) > limit else None
        return defer.succeed(([present_group(kind, g) for g in page], after))

    def get(self, kind: str, group_id: str) -> Deferred:
        group = self.groups[kind].get(group_id)
        return defer.succeed(None if group is None else present_group(kind, group, list(group["samples"])))

    def act(self, kind: str, group_id: str, action: str, by: str) -> Deferred:
        group = self.groups[kind].get(group_id)
        if group is None:
            return defer.succeed(None)
        if action == "ack":
            group["acked_by"], group["acked_at"] = by, self.clock.seconds()
        elif action == "close":
            if group["state"] not in ENDED[kind]:
                self._enter(kind, group, "CLOSED" if kind == "eco" else "closed", group["last_time"])
        elif group["state"] in ENDED[kind]:  # reopen
            self._enter(kind, group, OPEN[kind], group["last_time"])
        return self.get(kind, group_id)

    def prune(self, kind: str, ended_before: float) -> Deferred:
        old = [gid for gid, g in self.groups[kind].items()
               if g["state"] in ENDED[kind] and g.get("ended_at", ended_before) < ended_before][:PRUNE_BATCH]
        for gid in old:
            del self.groups[kind][gid]
        return defer.succeed(len(old))
