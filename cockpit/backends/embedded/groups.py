"""Event groups in this process's memory (the embedded backend)."""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cockpit.events import Event
from cockpit.groups import (ENDED, OPEN, PRUNE_BATCH, DueNotice, GroupPage, GroupStore, group_cursor, notice_of,
                            occurrence, parse_group_cursor, present_group, sort_field, transition)


class MemoryGroupStore(GroupStore):
    remember = 100000  # guids kept to count a redelivered event once

    def __init__(self, clock: IReactorTime, samples: int = 20):
        super().__init__(clock, samples)
        self.groups: dict[str, dict[str, dict[str, Any]]] = {"eco": {}, "alarm": {}}
        self.seen: "OrderedDict[str, None]" = OrderedDict()  # the latest guids counted
        self.due: dict[tuple[str, str], float] = {}  # (kind, id) -> when its notice is due

    def record(self, event: Event) -> Deferred[bool]:
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
            reason = notice_of(seen.kind, old, new)
            if reason:
                self._due(seen.kind, group, reason, self.clock.seconds())
        return defer.succeed(True)

    def _due(self, kind: str, group: dict[str, Any], reason: str, at: float) -> None:
        group["notice"] = reason
        self.due[(kind, group["id"])] = at

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
             sort: str = "last_time") -> Deferred[GroupPage]:
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

    def get(self, kind: str, group_id: str) -> Deferred[Optional[dict[str, Any]]]:
        group = self.groups[kind].get(group_id)
        return defer.succeed(None if group is None else present_group(kind, group, list(group["samples"])))

    def act(self, kind: str, group_id: str, action: str, by: str) -> Deferred[Optional[dict[str, Any]]]:
        group = self.groups[kind].get(group_id)
        if group is None:
            return defer.succeed(None)
        if action == "ack":
            group["acked_by"], group["acked_at"] = by, self.clock.seconds()
            self.due.pop((kind, group_id), None)  # an ack stops the repeats
        elif action == "close":
            if group["state"] not in ENDED[kind]:
                self._enter(kind, group, "CLOSED" if kind == "eco" else "closed", group["last_time"])
                self.due.pop((kind, group_id), None)
        elif group["state"] in ENDED[kind]:  # reopen
            self._enter(kind, group, OPEN[kind], group["last_time"])
            self._due(kind, group, "reopened", self.clock.seconds())
        return self.get(kind, group_id)

    def prune(self, kind: str, ended_before: float) -> Deferred[int]:
        old = [gid for gid, g in self.groups[kind].items()
               if g["state"] in ENDED[kind] and g.get("ended_at", ended_before) < ended_before][:PRUNE_BATCH]
        for gid in old:
            del self.groups[kind][gid]
            self.due.pop((kind, gid), None)
        return defer.succeed(len(old))

    def claim_notices(self, lease: float, limit: int = 100) -> Deferred[list[DueNotice]]:
        now = self.clock.seconds()
        out = []
        for (kind, gid), at in sorted(self.due.items(), key=lambda item: item[1])[:limit]:
            if at > now:
                break
            group = self.groups[kind].get(gid)
            if group is None or not group.get("notice"):
                del self.due[(kind, gid)]
                continue
            self.due[(kind, gid)] = now + lease
            out.append((kind, present_group(kind, group), group["notice"]))
        return defer.succeed(out)

    def noticed(self, kind: str, group_id: str, reason: str, sent: bool, repeat: float) -> Deferred[None]:
        group = self.groups[kind].get(group_id)
        if group is None:
            self.due.pop((kind, group_id), None)
            return defer.succeed(None)
        if not sent:
            if group.get("notice") == reason:
                group["notice"] = "held"
                self.due.pop((kind, group_id), None)
            return defer.succeed(None)
        now = self.clock.seconds()
        group["notified_at"] = now
        group["notices"] = group.get("notices", 0) + 1
        if group["state"] == "NEW":
            self._enter(kind, group, "ALERT", group["last_time"])
        if group.get("notice") != reason:
            return defer.succeed(None)
        if group["state"] not in ENDED[kind] and not group.get("acked_by"):
            self._due(kind, group, "repeat", now + repeat)
        else:
            group["notice"] = "sent"
            self.due.pop((kind, group_id), None)
        return defer.succeed(None)

    def notice_due(self, kind: str, group_id: str, reason: str) -> Deferred[bool]:
        group = self.groups[kind].get(group_id)
        if group is None or group["state"] in ENDED[kind]:
            return defer.succeed(False)
        self._due(kind, group, reason, self.clock.seconds())
        return defer.succeed(True)
