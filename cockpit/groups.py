"""Event groups: error conditions (ecos) by fingerprint and alarms by service and method.

A repeat of a condition raises its count and ``last_time`` and makes no new group.
``EventGroups`` is fed by the bus consumer group ``groups``, so each event is counted by
one process however many share the bus. Where the groups live is the backend's
(:mod:`cockpit.backends`): Redis, shared by every process, or this process's memory.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from twisted.application.service import Service

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cockpit.bus import Bus, Delivery
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


def group_update(event: Event) -> tuple[str, str, int, int, Optional[str], dict[str, Any]]:
    """(kind, id, time, count, state or None, latest fields) of what ``event`` adds to its group."""
    if isinstance(event, EcoEvent):
        fingerprint = event.fingerprint
        data = event.to_dict()
        for name in ("type", "epoch", "source", "state", "occurence", "last_time", "close_time"):
            data.pop(name, None)
        data["fingerprint"] = fingerprint
        state = event.state if event.state in ("ALERT", "CLOSED") else "NEW"
        return "eco", fingerprint, event.last_time or event.epoch, max(event.occurence, 1), state, data
    assert isinstance(event, AlarmEvent)
    data = {"service": event.service, "method": event.method, "msg": event.msg}
    return "alarm", alarm_group_id(event), event.epoch, 1, None, data


def next_state(current: Optional[str], reported: str) -> str:
    # a repeat of an open or closed condition is an alert, unless the report closes it
    if current is None:
        return reported
    return "CLOSED" if reported == "CLOSED" else "ALERT"


def present_group(kind: str, group: dict[str, Any]) -> dict[str, Any]:
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


def group_cursor(group: dict[str, Any]) -> str:
    return f"{group['last_time']}:{group['id']}"


def parse_group_cursor(before: Optional[str]) -> Optional[tuple[int, str]]:
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


class EventGroups(Service):
    """Counts eco and alarm events into groups, once per event across every process."""

    def __init__(self, bus: Bus, store: GroupStore, **consumer_options: Any):
        self.bus = bus
        self.store = store
        if bus.remote:
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
