"""Event groups in this process's memory (the embedded backend)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred

from cockpit.events import Event
from cockpit.groups import GroupStore, group_cursor, group_update, next_state, parse_group_cursor, present_group


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
        kind, group_id, when, count, state, data = group_update(event)
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
            group["state"] = next_state(group["state"], state)
        return defer.succeed(True)

    def page(self, kind: str, limit: int, before: Optional[str]) -> Deferred:
        try:
            bound = parse_group_cursor(before)
        except ValueError as exc:
            return defer.fail(exc)
        ordered = sorted(self.groups[kind].values(), key=lambda g: (g["last_time"], g["id"]), reverse=True)
        if bound is not None:
            ordered = [g for g in ordered if (g["last_time"], g["id"]) < bound]
        chosen = ordered[:limit]
        after = group_cursor(chosen[-1]) if len(ordered) > limit else None
        return defer.succeed(([present_group(kind, g) for g in chosen], after))
