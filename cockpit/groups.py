"""Event groups: error conditions (ecos) and alarms, each counted into one group, with a lifecycle.

docs/design.md §10 is the contract. An eco's group is its fingerprint; an alarm's is its fingerprint when
the sender gives one, else its service, method and message (numbers masked, as in an eco's). A repeat raises the group's count and
``last_time``, keeps ``first_time`` and the latest ``[groups] samples`` events.

The lifecycle, the same in every backend:

- ecos go ``NEW`` → ``ALERT`` (notified) → ``CLOSED``; alarms ``firing`` → ``resolved`` (by a
  ``status: resolved`` alarm) or ``closed`` (by hand);
- a group that ended (closed or resolved) opens again when an occurrence newer than the one it
  ended on arrives; its counts and first time are kept, its ack is cleared. The time an ended
  group is compared with is the event time that ended it (a resolve's ``endsAt``), or, for a
  close by hand, the group's ``last_time``: so a copy of an occurrence seen before the close
  (Alertmanager repeats an alert with its old ``startsAt``) does not reopen it;
- a resolve older than the group's ``last_time`` is a late copy and changes nothing;
- an ack records who and when.

``EventGroups`` is fed by the bus consumer group ``groups``, so each event is counted by one
process however many share the bus, and once however often it is delivered (its guid is
remembered a day). Where the groups live is the backend's (:mod:`cockpit.backends`): Redis,
shared by every process, or this process's memory.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Generator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cockpit.bus import Bus, Delivery
from cockpit.events import AlarmEvent, EcoEvent, Event, fingerprint_of, mask_variables

log = Logger()

GROUPS_CONSUMER = "groups"
SEEN_TTL = 86400  # seconds a counted guid is remembered
PRUNE_EVERY = 3600.0  # seconds between two prunings of ended groups
PRUNE_BATCH = 500  # groups removed by one call to the store

KINDS = ("eco", "alarm")
OPEN = {"eco": "NEW", "alarm": "firing"}
ENDED = {"eco": ("CLOSED",), "alarm": ("resolved", "closed")}
STATES = {"eco": ("NEW", "ALERT", "CLOSED"), "alarm": ("firing", "resolved", "closed")}
CLOSED = {"eco": "CLOSED", "alarm": "closed"}
ACTIONS = ("ack", "close", "reopen")
GROUP_ID = re.compile(r"^[0-9a-f]{32}$")


# -- the wire models -------------------------------------------------------------------

class Acked(BaseModel):
    by: str = Field(description="Who acked it: the name given to the ack, or the chat user.")
    at: float = Field(description="When, in seconds since 1970.")


class _Group(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(description="The group's id: 32 hex digits.")
    first_time: int = Field(description="The time of its first occurrence.")
    last_time: int = Field(description="The time of its latest occurrence.")
    acked: Optional[Acked] = Field(None, description="Who acked it and when; null when it is not acked.")
    ended_at: Optional[float] = Field(None, description="When it was closed or resolved; null while open.")
    reopened: int = Field(0, description="How often it opened again after it ended.")
    notices: int = Field(0, description="How many notices it has sent.")


class EcoGroup(_Group):
    """One error condition: the latest eco's own fields, and how often and when it happened."""

    fingerprint: str
    state: Literal["NEW", "ALERT", "CLOSED"]
    occurence: int
    guid: str = Field(description="The latest eco's guid.")


class AlarmGroup(_Group):
    """One alarm: the latest alarm's fields, and how often and when it fired."""

    service: str
    method: str
    msg: str = Field(description="The latest alarm's message.")
    state: Literal["firing", "resolved", "closed"]
    severity: str = ""
    count: int


class EcoGroupDetail(EcoGroup):
    samples: list[dict[str, Any]] = Field(description="The latest occurrences, newest first, as events.")


class AlarmGroupDetail(AlarmGroup):
    samples: list[dict[str, Any]] = Field(description="The latest occurrences, newest first, as events.")


class EcoGroupList(BaseModel):
    ecos: list[EcoGroup]
    next: Optional[str] = Field(None, description="Pass as `before` for the next page; null at the end.")


class AlarmGroupList(BaseModel):
    alarms: list[AlarmGroup]
    next: Optional[str] = Field(None, description="Pass as `before` for the next page; null at the end.")


# -- what one event adds ---------------------------------------------------------------

@dataclass(frozen=True)
class Occurrence:
    """What one eco or alarm event adds to its group."""

    kind: str
    id: str
    time: int
    count: int  # what it adds to the count: an eco may report several occurrences at once
    reported: str  # the state the event reports: NEW, ALERT or CLOSED; firing or resolved
    data: dict[str, Any]  # the group's fields, from the latest occurrence
    sample: dict[str, Any]  # the event itself


def group_id(fingerprint: str) -> str:
    """A URL-safe id for a fingerprint: itself when it is 32 hex digits already, else its hash."""
    return fingerprint if GROUP_ID.match(fingerprint) else fingerprint_of(fingerprint)


def alarm_group_id(event: AlarmEvent) -> str:
    if event.fingerprint:
        return group_id(event.fingerprint)
    # numbers masked as in an eco's message: "disk 91% full" and "disk 93% full" are one condition
    return fingerprint_of(event.service, event.method, mask_variables(event.msg))


def occurrence(event: Event) -> Occurrence:
    sample = event.to_dict()
    if isinstance(event, EcoEvent):
        data = dict(sample)
        for name in ("type", "epoch", "source", "state", "occurence", "last_time", "close_time"):
            data.pop(name, None)
        reported = event.state if event.state in ("ALERT", "CLOSED") else "NEW"
        return Occurrence("eco", group_id(event.fingerprint), event.last_time or event.epoch,
                          max(event.occurence, 1), reported, data, sample)
    assert isinstance(event, AlarmEvent)
    data = {name: sample[name] for name in ("service", "method", "msg", "severity", "labels", "annotations",
                                            "fingerprint", "url", "status", "source", "guid")}
    return Occurrence("alarm", alarm_group_id(event), event.epoch, 1, event.status, data, sample)


def transition(kind: str, state: Optional[str], reported: str, time: int, last_time: int,
               ended_time: Optional[int]) -> str:
    """The state a group in ``state`` (None: new) takes on an occurrence reporting ``reported``.

    The Lua of the Redis backend follows the same rules; the backends share their tests.
    """
    if kind == "eco":
        if reported == "CLOSED":
            return "CLOSED"
        if state is None:
            return reported
        if state == "CLOSED":
            return "NEW" if ended_time is None or time > ended_time else "CLOSED"
        return "ALERT" if reported == "ALERT" else state
    if reported == "resolved":
        if state is None:
            return "resolved"
        return "resolved" if state == "firing" and time >= last_time else state
    if state is None or state == "firing":
        return "firing"
    return "firing" if ended_time is None or time > ended_time else state


def notice_of(kind: str, old: Optional[str], new: str) -> Optional[str]:
    """Why a group that went from ``old`` (None: new) to ``new`` owes a notice, if it does."""
    if old is None:
        return None if new in ENDED[kind] else "opened"
    if old in ENDED[kind] and new not in ENDED[kind]:
        return "reopened"
    if new in ENDED[kind] and old not in ENDED[kind]:
        return "resolved"
    return None


def present_group(kind: str, group: dict[str, Any], samples: Optional[list[Any]] = None) -> dict[str, Any]:
    """The REST form of a group as a store keeps it (a dict of strings, in Redis)."""
    data = group.get("data", {})
    out = dict(json.loads(data) if isinstance(data, str) else data)
    out["id"] = group["id"]
    out["state"] = group["state"]
    out["first_time"] = int(group["first_time"])
    out["last_time"] = int(group["last_time"])
    out["count" if kind == "alarm" else "occurence"] = int(group["count"])
    by = group.get("acked_by")
    out["acked"] = {"by": by, "at": float(group["acked_at"])} if by not in (None, "") else None
    ended = group.get("ended_at")
    out["ended_at"] = float(ended) if ended not in (None, "") else None
    out["reopened"] = int(group.get("reopened") or 0)
    out["notices"] = int(group.get("notices") or 0)
    if kind == "eco":
        out["close_time"] = int(out["ended_at"]) if out["state"] == "CLOSED" and out["ended_at"] else None
    if samples is not None:
        out["samples"] = [json.loads(s) if isinstance(s, str) else s for s in samples]
    return out


def group_cursor(score: Any, group_id: str) -> str:
    return f"{int(float(score))}:{group_id}"


def parse_group_cursor(before: Optional[str]) -> Optional[tuple[int, str]]:
    if not before:
        return None
    score, _, group_id = before.partition(":")
    if not score.isdigit() or not group_id:
        raise ValueError(f"before: expected the `next` of a previous page, such as 1700000000:ab12..., "
                         f"got {before!r}")
    return int(score), group_id


def sort_field(sort: str) -> str:
    """``last_time`` or ``count``: what a list is ordered by (``occurence`` is an eco's count)."""
    return "count" if sort in ("count", "occurence") else "last_time"


# -- the store -------------------------------------------------------------------------

# a page of groups, and the cursor of the next page or None
GroupPage = tuple[list[dict[str, Any]], Optional[str]]
# a notice that is due: (kind, group, reason)
DueNotice = tuple[str, dict[str, Any], str]


class GroupStore:
    """Where groups live. Every call fires later; each is atomic against every other process.

    ``samples`` is how many latest occurrences a group keeps; ``clock`` gives the times of acks
    and closes.
    """

    def __init__(self, clock: IReactorTime, samples: int = 20):
        self.clock = clock
        self.samples = samples

    def record(self, event: Event) -> Deferred[bool]:
        """Count ``event`` into its group; fires True, or False when its guid was counted already."""
        raise NotImplementedError

    def page(self, kind: str, limit: int, before: Optional[str], state: Optional[str] = None,
             sort: str = "last_time") -> Deferred[GroupPage]:
        """Fires with ``(groups, next cursor or None)``, by ``sort`` from the highest."""
        raise NotImplementedError

    def get(self, kind: str, group_id: str) -> Deferred[Optional[dict[str, Any]]]:
        """Fires with the group and its samples, newest first, or None."""
        raise NotImplementedError

    def act(self, kind: str, group_id: str, action: str, by: str) -> Deferred[Optional[dict[str, Any]]]:
        """``ack``, ``close`` or ``reopen`` a group; fires with it as it is then, or None if there is none."""
        raise NotImplementedError

    def prune(self, kind: str, ended_before: float) -> Deferred[int]:
        """Remove up to PRUNE_BATCH groups of ``kind`` that ended before then; fires with how many."""
        raise NotImplementedError

    # A group's notice is due when it opens, reopens or resolves (the change that does it makes it
    # due, in the same atomic step), and again every ``repeat`` while it is open and nobody acked it.
    # An ack or a close stops the repeats. ``claim_notices`` leases what is due to one caller, so
    # that every process may send notices and each goes out once; a caller that dies leaves it to
    # the next one after ``lease`` seconds.
    def claim_notices(self, lease: float, limit: int = 100) -> Deferred[list[DueNotice]]:
        """Fires with ``[(kind, group, reason)]``: the notices due now, leased to this caller."""
        raise NotImplementedError

    def noticed(self, kind: str, group_id: str, reason: str, sent: bool, repeat: float) -> Deferred[None]:
        """A claimed notice was ``sent`` (an eco NEW turns ALERT; a repeat is due after ``repeat``),
        or held back (silenced: no repeat). A newer reason that came meanwhile stays due."""
        raise NotImplementedError

    def notice_due(self, kind: str, group_id: str, reason: str) -> Deferred[bool]:
        """Make an open group's notice due now (a silence over it ended); fires False if it is not open."""
        raise NotImplementedError


class EventGroups(Service):
    """Counts eco and alarm events into groups, once per event across every process.

    Every hour (and at start) it removes the groups that ended more than ``keep_days`` ago.
    """

    def __init__(self, bus: Bus, store: GroupStore, clock: IReactorTime, keep_days: float = 30.0,
                 **consumer_options: Any):
        self.bus = bus
        self.store = store
        self.clock = clock
        self.keep_days = keep_days
        if bus.remote:
            # counting may lag a moment: reading and recording in larger batches costs less
            consumer_options = {"concurrency": 512, "linger": 0.05, **consumer_options}
        self.consumer = bus.consumer(GROUPS_CONSUMER, self._handle, types=("eco", "alarm"), **consumer_options)
        self._pruning = LoopingCall(self.prune)
        self._pruning.clock = clock
        self.pruned = 0

    def _handle(self, event: Event, delivery: Delivery) -> Deferred[bool]:
        return self.store.record(event)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.consumer.startService()
        self._pruning.start(PRUNE_EVERY, now=True).addErrback(
            lambda f: log.failure("pruning event groups stopped", f))

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if self._pruning.running:
            self._pruning.stop()
        return self.consumer.stopService()

    @inlineCallbacks
    def prune(self) -> Generator[Deferred[int], int, None]:
        """Remove what ended more than ``keep_days`` ago; a failure is logged and tried next time."""
        cutoff = self.clock.seconds() - self.keep_days * 86400
        try:
            for kind in KINDS:
                while True:
                    removed = yield self.store.prune(kind, cutoff)
                    self.pruned += removed
                    if removed < PRUNE_BATCH:
                        break
        except Exception as exc:
            log.warn("event groups could not be pruned now: {error}", error=str(exc))

    def ecos(self, limit: int = 50, before: Optional[str] = None, state: Optional[str] = None,
             sort: str = "last_time") -> Deferred[GroupPage]:
        """Fires with ``(eco groups, next cursor)``, most recent (or most frequent) first."""
        return self.store.page("eco", limit, before, state, sort)

    def alarms(self, limit: int = 50, before: Optional[str] = None, state: Optional[str] = None,
               sort: str = "last_time") -> Deferred[GroupPage]:
        return self.store.page("alarm", limit, before, state, sort)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "handled": self.consumer.handled, "inflight": len(self.consumer.inflight),
                "pruned": self.pruned}
