"""Heartbeats (dead-man switches, docs/design.md §11): a job says "I am alive"; silence past its timeout is an alarm.

``POST /api/heartbeats/{name}`` beats; when no beat has come within the heartbeat's timeout, one
firing ``alarm`` is published (``service: heartbeat!<name>``, ``fingerprint: heartbeat:<name>``),
and the next beat publishes its ``resolved`` twin. A Sentry ``check_in`` beats too, and its status
``error`` fires the alarm at once (:mod:`cockpit.sentry`).

The state is the backend's (:class:`HeartbeatStore`: a hash per heartbeat and a sorted set of what
is due, on Redis), so every process sees one heartbeat and each deadline is acted on once across
the cluster. What is due is *claimed* under a lease: its due time moves to now + lease while the
alarm is published, and the claim is confirmed once the publish succeeded. A process that dies
between the two leaves the claim to lapse, and another publishes the same event again: its guid is
uuid5 of the name, the deadline and the beat before it (a resolve's: of its firing's guid), so
downstream counts it once.

A record's fields (every value text, as a Redis hash holds them): ``name``, ``timeout``,
``last_beat`` (empty: never beaten), ``deadline`` (``%.3f``), ``fired`` (the guid of the firing
alarm published and not resolved yet), ``fired_epoch``, ``resolve`` (the guid of the firing whose
resolve is owed), ``resolving_at`` (the beat that ended it), ``resolved_epoch``, ``error`` (``1``
after a check-in reported an error, until an ok beat).
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Generator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from cockpit import events
from cockpit.bus import Bus
from cockpit.deferreds import settled
from cockpit.events import AlarmEvent
from cockpit.openapi import ApiError, Body, Param, Response, RouteTable

log = Logger()

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
NAME = re.compile(NAME_PATTERN)
DEFAULT_TIMEOUT = 300.0  # seconds, when a heartbeat was never given one
MIN_TIMEOUT = 1.0
MAX_TIMEOUT = 30 * 86400.0
LEASE = 30.0  # seconds a claim is held while its alarm is published
CHECK_EVERY = 1.0  # seconds between two looks at what is due
CLAIM_BATCH = 100  # heartbeats claimed by one look
# a firing's guid is uuid5(this, "<name>/firing/<deadline>/<last beat>"), its resolve's
# uuid5(this, "<name>/resolved/<firing guid>"): every process derives the same ones
HEARTBEAT_NAMESPACE = uuid.UUID("6b3f0d0e-6f1c-4c47-9d39-2a4f7e1c5b83")


def deadline_text(when: float) -> str:
    """A deadline as both backends store it (milliseconds): it is part of the alarms' guids."""
    return f"{when:.3f}"


def clamp_timeout(seconds: float) -> float:
    return min(max(float(seconds), MIN_TIMEOUT), MAX_TIMEOUT)


# -- the wire models -------------------------------------------------------------------

class BeatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout: Optional[float] = Field(None, ge=MIN_TIMEOUT, le=MAX_TIMEOUT,
                                     description="Seconds the next beat may take (1 s to 30 days); "
                                                 "kept for later beats. Default: the heartbeat's own, else 300.")


class Heartbeat(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    timeout: float = Field(description="Seconds a beat may take before the heartbeat is late.")
    last_beat: Optional[float] = Field(description="When the latest beat came (seconds since 1970); "
                                                   "null when none has (a check-in error made it).")
    state: Literal["ok", "late"]
    late_since: Optional[float] = Field(None, description="When it went late; null while ok.")


class HeartbeatList(BaseModel):
    heartbeats: list[Heartbeat]
    next: Optional[str] = Field(None, description="Pass as `before` for the next page; null at the end.")


class HeartbeatQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(50, ge=1, le=1000, description="At most this many.")
    before: Optional[str] = Field(None, pattern=NAME_PATTERN, description="Paging: the `next` of the previous "
                                                                          "page (the list is by name).")


# -- what a store hands out -----------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One heartbeat as stored: see the module docstring for the fields."""

    fields: dict[str, str]

    def get(self, name: str) -> str:
        return self.fields.get(name) or ""

    @property
    def name(self) -> str:
        return self.get("name")

    def present(self, now: float) -> dict[str, Any]:
        deadline = float(self.get("deadline") or 0)
        late = bool(self.get("fired")) or self.get("error") == "1" or deadline <= now
        last_beat = self.get("last_beat")
        return {"name": self.name, "timeout": float(self.get("timeout")),
                "last_beat": float(last_beat) if last_beat else None, "state": "late" if late else "ok",
                "late_since": deadline if late else None}


@dataclass(frozen=True)
class Work:
    """An alarm a store has leased to this process: ``fire`` or ``resolve``; published, then confirmed.
    Its ``key`` is the guid of the firing (the one to publish, or the one to resolve)."""

    action: Literal["fire", "resolve"]
    record: Record

    @property
    def key(self) -> str:
        record = self.record
        if self.action == "resolve":
            return record.get("resolve")
        # a lateness is its deadline and the beat before it: an error may share a deadline with a timeout
        lateness = f"{record.name}/firing/{record.get('deadline')}/{record.get('last_beat')}"
        return str(uuid.uuid5(HEARTBEAT_NAMESPACE, lateness))

    @property
    def epoch(self) -> int:
        """The event's time: a firing is later than the resolve before it, a resolve not earlier than its
        firing, so that the alarm group opens and resolves by them (its times are whole seconds)."""
        record = self.record
        if self.action == "fire":
            return max(int(float(record.get("deadline"))) + 1, int(record.get("resolved_epoch") or 0) + 1)
        return max(int(float(record.get("resolving_at") or 0)), int(record.get("fired_epoch") or 0))

    def event(self) -> AlarmEvent:
        record, name = self.record, self.record.name
        status = "firing" if self.action == "fire" else "resolved"
        if self.action == "resolve":
            msg = "heartbeat received again"
        elif record.get("error") == "1":
            msg = "the check-in reported an error"
        else:
            msg = f"no heartbeat for {int(float(record.get('timeout')))} s"
        key = self.key
        event = events.from_data({
            "type": "alarm", "source": "heartbeat",
            "guid": key if self.action == "fire" else str(uuid.uuid5(HEARTBEAT_NAMESPACE, f"{name}/resolved/{key}")),
            "epoch": self.epoch, "service": f"heartbeat!{name}", "method": "heartbeat", "msg": msg,
            "status": status, "severity": "critical", "fingerprint": f"heartbeat:{name}"})
        assert isinstance(event, AlarmEvent)
        return event


class HeartbeatStore:
    """Where heartbeats live, shared by every process on the backend; every call is one atomic step on
    ``clock``'s time.

    Implementations: :class:`cockpit.backends.redis.heartbeats.RedisHeartbeatStore` and
    :class:`cockpit.backends.embedded.heartbeats.MemoryHeartbeatStore`.
    """

    def __init__(self, clock: IReactorTime):
        self.clock = clock

    def beat(self, name: str, timeout: Optional[float], lease: float,
             in_progress: bool = False) -> Deferred[tuple[Record, Optional[Work]]]:
        """Record a beat (``timeout`` None: keep the heartbeat's own, else the default); fires with
        ``(Record, Optional[Work])``: the resolve this beat owes, leased to the caller.
        ``in_progress`` (a check-in's) leaves a heartbeat that reported an error as it is."""
        raise NotImplementedError

    def fail(self, name: str, timeout: Optional[float], lease: float) -> Deferred[tuple[Record, Optional[Work]]]:
        """A check-in reported an error: late now; fires with ``(Record, Optional[Work])``: the firing
        alarm, leased to the caller, unless it is out already or another process is publishing it."""
        raise NotImplementedError

    def claim(self, lease: float, limit: int) -> Deferred[list[Work]]:
        """Lease what is due (deadlines passed, resolves owed, lapsed leases); fires with ``[Work]``."""
        raise NotImplementedError

    def confirm(self, work: Work) -> Deferred[bool]:
        """``work``'s alarm is on the bus: record it, so that no process publishes it again. A firing
        whose heartbeat beat meanwhile leaves its resolve owed (and due now)."""
        raise NotImplementedError

    def page(self, limit: int, before: Optional[str]) -> Deferred[tuple[list[Record], Optional[str]]]:
        """Fires with ``([Record], next name or None)``, by name, after ``before``."""
        raise NotImplementedError


# -- the service --------------------------------------------------------------------------

class Heartbeats(Service):
    """Beats, check-ins and the deadline check (every second, on ``clock``) over ``store`` and ``bus``."""

    def __init__(self, store: HeartbeatStore, bus: Bus, clock: IReactorTime,
                 interval: float = CHECK_EVERY, lease: float = LEASE):
        self.store = store
        self.bus = bus
        self.clock = clock
        self.interval = interval
        self.lease = lease
        self.fired = 0
        self.resolved = 0
        self.checks = 0  # looks at what is due that went through
        self.last_error: Optional[str] = None
        self._loop: Optional[LoopingCall] = None
        self._checking: Optional[Deferred[Any]] = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Optional[Deferred[Any]]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._checking is not None:  # let the alarm being published be confirmed
            return self._checking
        return None

    def health(self) -> dict[str, Any]:
        return {"ok": self.last_error is None, "checks": self.checks, "fired": self.fired,
                "resolved": self.resolved, "error": self.last_error}

    def idle(self) -> Deferred[None]:
        """Fires once the look under way, if any, has finished."""
        return settled(self._checking)

    def _tick(self) -> None:
        if self._checking is not None:
            return  # the last look is still at work (Redis is slow): not two at once
        d = self._checking = self.check()

        def done(result: Any) -> None:
            self._checking = None

        d.addErrback(self._check_failed).addBoth(done)

    def _check_failed(self, failure: Failure) -> None:
        error = failure.getErrorMessage()
        if error != self.last_error:  # unless the bus says it lost Redis: then that is what it was
            self.bus.unless_lost(partial(log.warn, "heartbeats: could not check the deadlines ({error}); trying again",
                                         error=error))
        self.last_error = error

    @inlineCallbacks
    def check(self) -> Generator[Deferred[Any], Any, int]:
        """Claim what is due and publish its alarms; fires with how many were published."""
        due = yield self.store.claim(self.lease, CLAIM_BATCH)
        published = 0
        for work in due:
            try:
                yield self._publish(work)
                published += 1
            except Exception as exc:  # its lease lapses and a later look (here or elsewhere) retries it
                log.warn("heartbeat {name}: the {action} alarm could not be published ({error}); retried in "
                         "{lease} s", name=work.record.name, action=work.action, error=str(exc), lease=self.lease)
        self.last_error = None
        self.checks += 1
        return published

    @inlineCallbacks
    def _publish(self, work: Work) -> Generator[Deferred[Any], Any, None]:
        event = work.event()
        yield self.bus.publish(event)
        yield self.store.confirm(work)
        if work.action == "fire":
            self.fired += 1
            log.info("heartbeat {name} is late: alarm {guid}", name=work.record.name, guid=event.guid)
        else:
            self.resolved += 1
            log.info("heartbeat {name} beats again: alarm {guid} resolved", name=work.record.name, guid=event.guid)

    @inlineCallbacks
    def beat(self, name: str, timeout: Optional[float] = None,
             in_progress: bool = False) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """Record a beat and publish the resolve it owes; fires with the heartbeat as presented.

        Fails with BusUnavailable when the beat or its resolve cannot be stored (the resolve, once owed,
        is also retried by the check after its lease).
        """
        record: Record
        owed: Optional[Work]
        record, owed = yield self.store.beat(name, None if timeout is None else clamp_timeout(timeout),
                                             self.lease, in_progress)
        if owed is not None:
            yield self._publish(owed)
        return record.present(self.clock.seconds())

    @inlineCallbacks
    def fail(self, name: str, timeout: Optional[float] = None) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        """A check-in reported an error: the heartbeat is late now, and its alarm is published at once."""
        record: Record
        owed: Optional[Work]
        record, owed = yield self.store.fail(name, None if timeout is None else clamp_timeout(timeout), self.lease)
        if owed is not None:
            yield self._publish(owed)
        return record.present(self.clock.seconds())

    def check_in(self, name: str, status: str, timeout: Optional[float] = None) -> Deferred[dict[str, Any]]:
        """A Sentry check-in: ``ok`` and ``in_progress`` beat, ``error`` fails."""
        if status == "error":
            return self.fail(name, timeout)
        return self.beat(name, timeout, in_progress=status == "in_progress")

    def page(self, limit: int, before: Optional[str]) -> Deferred[tuple[list[dict[str, Any]], Optional[str]]]:
        now = self.clock.seconds()
        return self.store.page(limit, before).addCallback(
            lambda found: ([record.present(now) for record in found[0]], found[1]))


# -- the routes -----------------------------------------------------------------------------

def _checked_name(name: str) -> str:
    if not NAME.match(name):
        raise ApiError(400, f"a heartbeat's name is 1 to 100 letters, digits, '.', '_' or '-', got {name[:100]!r}")
    return name


class HeartbeatsApi:
    """``/api/heartbeats``: mounted with ``api.include(HeartbeatsApi(heartbeats))``."""

    routes = RouteTable(tag="heartbeats")

    def __init__(self, heartbeats: Heartbeats):
        self.heartbeats = heartbeats

    @routes.post("/api/heartbeats/{name}", summary="Say that a job is alive (a dead-man switch)",
                 description="Each beat restarts the heartbeat's timer. When no beat comes within its timeout, "
                             "one firing `alarm` is published (`source: heartbeat`, `service: heartbeat!<name>`, "
                             "`method: heartbeat`, `fingerprint: heartbeat:<name>`, `severity: critical`), "
                             "once across every cockpit on the bus; the next beat publishes the `resolved` alarm. "
                             "The body is optional: `timeout` (seconds, 1 to 30 days) is kept for later beats; "
                             "the default is 300. 503 when the beat, or the resolve it owes, cannot be stored.",
                 params={"name": Param("The heartbeat's name (it becomes the alarm's service instance)",
                                       {"type": "string", "pattern": NAME_PATTERN})},
                 body=Body(BeatBody, required=False, examples={"five minutes": {"timeout": 300}}),
                 responses={200: Response("The beat is recorded", Heartbeat),
                            503: Response("The heartbeats cannot be stored now")})
    async def beat(self, request: Request, name: str, body: Optional[BeatBody] = None) -> dict[str, Any]:
        return await self.heartbeats.beat(_checked_name(name), body.timeout if body is not None else None)

    @routes.get("/api/heartbeats", summary="The heartbeats, by name, with their state", query=HeartbeatQuery,
                description="Each heartbeat's timeout, latest beat, and whether it is `ok` or `late` "
                            "(and since when).",
                responses={200: Response("The heartbeats", HeartbeatList),
                           503: Response("The heartbeats cannot be read now")})
    async def list_heartbeats(self, request: Request, query: HeartbeatQuery) -> dict[str, Any]:
        found, after = await self.heartbeats.page(query.limit, query.before)
        return {"heartbeats": found, "next": after}
