"""The event bus: live fan-out, a durable log and consumer groups; what every backend's bus offers.

The implementations are :class:`cockpit.backends.redis.bus.RedisBus` and the embedded
:class:`cockpit.backends.embedded.bus.MemoryBus`; both pass one shared test suite. The
delivery logic of consumer groups (:class:`Consumer`) is written once, here: a backend's
consumer only talks to its storage.
"""
from __future__ import annotations

import os
from functools import partial
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional, Sequence, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.events import EVENT_TYPES, Event, from_stored
from cockpit.metrics import NO_METRICS, NullMetrics

log = Logger()

_T = TypeVar("_T")

STREAM_PREFIX = "ckpt."
DEAD_LETTER_STREAM = "ckpt.dead"
AYS_GROUP = "ays"


def stream_key(event_type: str) -> str:
    """The channel and the stream of one event type: ``ckpt.<type>``."""
    return STREAM_PREFIX + event_type


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def cursor(entry_id: str, event_type: str) -> str:
    """A position in the merged log of every type: streams' ids can tie across types."""
    return f"{entry_id}/{event_type}"


def entry_order(entry_id: str, event_type: str) -> tuple[int, int, int]:
    return (*id_key(entry_id), EVENT_TYPES.index(event_type) if event_type in EVENT_TYPES else len(EVENT_TYPES))


def parse_before(before: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``id`` or ``id/type`` -> the order key entries must be below; ValueError when malformed."""
    if not before:
        return None
    entry_id, _, event_type = before.partition("/")
    ms, dash, seq = entry_id.partition("-")
    if not ms.isdigit() or (dash and not seq.isdigit()) or (event_type and event_type not in EVENT_TYPES):
        raise ValueError(f"before: expected a position such as 1700000000000-0 or 1700000000000-0/alarm, got {before!r}")
    return entry_order(entry_id, event_type or "~")


class BusUnavailable(Exception):
    """The bus cannot take the event now; ingress answers 503 (REST) or 451 (SMTP)."""


@dataclass(frozen=True)
class Delivery:
    """Where a consumed event came from and how often it has been handed out."""

    stream: str
    id: str
    deliveries: int


Handler = Callable[[Event, Delivery], Any]
# what a consumer's read fires with, per entry: (stream, id, raw), raw None where the entry holds no event
ReadEntry = tuple[str, str, Optional[str]]
# what a claim fires with, per entry: (stream, id, raw, deliveries)
ClaimedEntry = tuple[str, str, Optional[str], int]


class Subscription:
    """A live subscription; ``cancel()`` ends it."""

    def __init__(self, bus: "Bus", callback: Callable[[Event], Any], types: frozenset[str]):
        self._bus = bus
        self.callback = callback
        self.types = types
        self._ended: list[Deferred[None]] = []

    def cancel(self) -> None:
        self._bus._subscriptions.discard(self)
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)

    def when_cancelled(self) -> Deferred[None]:
        """Fires once the subscription has ended (at once if it has)."""
        if self not in self._bus._subscriptions:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._ended.append(d)
        return d


class Bus(Service):
    """What every bus offers. Implementations: :class:`RedisBus`, :class:`MemoryBus`."""

    kind = "abstract"
    remote = False  # whether a read costs a round trip: consumers then read in larger batches
    # seconds a consumer may go without a heartbeat before the others take over its entries;
    # None where all consumers live in this one process and cannot die alone
    consumer_timeout: Optional[float] = None
    # every event this bus stores is counted here (cockpit_events_published_total), whoever published it;
    # the service tree hands in its cockpit.metrics.Metrics
    metrics: NullMetrics = NO_METRICS

    def __init__(self, stream_maxlen: int = 100000, max_deliveries: int = 5,
                 claim_idle: float = 60.0, *, clock: IReactorTime):
        self.clock: IReactorTime = clock
        self.stream_maxlen = stream_maxlen
        self.max_deliveries = max_deliveries
        self.claim_idle = claim_idle
        self._subscriptions: set[Subscription] = set()
        self._reports: set[IDelayedCall] = set()  # unless_lost's reports still to come

    # -- publishing -------------------------------------------------------
    def stamp(self, event: Event) -> Event:
        """``event``, its ``epoch`` set from this bus's clock unless its maker gave one."""
        if "epoch" not in event.model_fields_set:
            event.epoch = int(self.clock.seconds())
        return event

    def publish(self, event: Event) -> Deferred[str]:
        """Log and fan out ``event``; fires with its stream entry id, or fails with BusUnavailable."""
        raise NotImplementedError

    def _stored(self, result: _T, event: Event) -> _T:
        """A publish's first callback: count ``event`` once the bus holds it (passes ``result`` on)."""
        self.metrics.published(event.type, event.source or "")
        return result

    # -- live ------------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], Any],
                  types: Optional[Iterable[str]] = None) -> Subscription:
        """Call ``callback(event)`` for each event published from now on (at most once, no replay)."""
        sub = Subscription(self, callback, frozenset(types or EVENT_TYPES))
        self._subscriptions.add(sub)
        self._live_wanted()
        return sub

    def _live_wanted(self) -> None:
        pass

    def reachable(self) -> bool:
        """Whether the bus has a connection now: while it has none it has said so once, and its
        users need not say it again on every retry."""
        return True

    # times the bus has said it lost its connection (each outage once)
    outages = 0

    def unless_lost(self, report: Callable[[], Any], grace: float = 1.0) -> None:
        """``report()`` in ``grace`` seconds, unless by then the bus has said it lost its connection.

        A user whose own connection failed calls this rather than logging at once: when Redis went
        away for everyone, the bus says so once, even if this user noticed first."""
        outages = self.outages

        def later() -> None:
            self._reports.discard(call)
            if self.outages == outages and self.reachable() and self.running:
                report()

        call = self.clock.callLater(grace, later)
        self._reports.add(call)

    def stopService(self) -> Any:
        reports, self._reports = self._reports, set()
        for call in reports:
            if call.active():
                call.cancel()
        return super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

    def when_connected(self) -> Deferred[None]:
        """Fires once the bus can take events (at once for a bus inside this process)."""
        return defer.succeed(None)

    def when_live(self) -> Deferred[None]:
        """Fires once live subscriptions receive what is published from then on."""
        return defer.succeed(None)

    def _deliver_live(self, event: Event) -> None:
        for sub in list(self._subscriptions):
            if event.type in sub.types:
                try:
                    sub.callback(event)
                except Exception:
                    log.failure("a live subscriber failed on {guid}", guid=event.guid)

    # -- durable ---------------------------------------------------------
    def consumer(self, group: str, handler: Handler, types: Sequence[str] = EVENT_TYPES,
                 name: Optional[str] = None, **options: Any) -> "Consumer":
        """A service that hands every event of ``types`` to ``handler`` once per ``group``.

        The entry is acknowledged when the handler's result (or Deferred) succeeds.
        A failed or abandoned entry is reclaimed after ``claim_idle`` seconds and moves
        to ``ckpt.dead`` after ``max_deliveries`` deliveries; on a shared bus, one whose
        handler failed with BusUnavailable is handed out again at the first beat that gets
        through.
        """
        raise NotImplementedError

    def recent(self, event_type: Optional[str] = None, limit: int = 50,
               before: Optional[str] = None) -> Deferred[list[tuple[str, Event]]]:
        """Fires with ``[(entry_id, event)]`` from the durable log, newest first."""
        raise NotImplementedError

    def dead_letters(self, limit: int = 50) -> Deferred[list[tuple[str, dict[str, str]]]]:
        """Fires with ``[(entry_id, fields)]`` of ``ckpt.dead``, newest first."""
        raise NotImplementedError

    def pending(self, group: str, types: Sequence[str] = EVENT_TYPES) -> Deferred[int]:
        """Fires with how many entries ``group`` has been handed and not acknowledged."""
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- marks shared by every process on the bus -----------------------------
    def remember(self, key: str, value: str, ttl: float) -> Deferred[bool]:
        """Keep ``value`` under ``key`` (``ckpt.``...) for ``ttl`` seconds unless it holds one already.

        Fires True when stored, False when the key already held a value (which is kept).
        """
        raise NotImplementedError

    def recall(self, key: str) -> Deferred[Optional[str]]:
        """Fires with the value remembered under ``key``, or None (never stored, or its ttl has passed)."""
        raise NotImplementedError

    def forget(self, key: str) -> Deferred[bool]:
        """Drop what is remembered under ``key``, so the next ``remember`` stores; fires True if it held one."""
        raise NotImplementedError


def mark_key(key: str) -> str:
    if not key.startswith(STREAM_PREFIX):
        raise ValueError(f"a mark's key starts with {STREAM_PREFIX!r}, got {key!r}")
    return key


_TAKEN: Deferred[None] = defer.succeed(None)

# beats per consumer_timeout: a beat may be late or lost a few times before the others judge
BEATS_PER_TIMEOUT = 5
TAKEOVER_BATCH = 200  # entries taken over from dead consumers per round trip


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Consumer(Service):
    """The delivery logic both buses share; subclasses only talk to their storage.

    On a bus shared by several processes (``bus.consumer_timeout`` set) a consumer beats every
    ``consumer_timeout / 5`` seconds; at each beat it takes over the entries of the consumers of
    its group whose heartbeat has lapsed, and removes them from the group. After the bus failed it
    (a read, a beat or a claim cut off, or a handler failing with BusUnavailable), the first beat that
    gets through also takes back what the group holds for this consumer and nobody here handles: a
    delivery whose reply the failure took, an entry whose handler met the bus away. They would
    otherwise wait ``claim_idle`` for a reclaim. A stop drains what was handed out, acknowledges it,
    then leaves the group (or, with entries still unfinished, ends its heartbeat so that the others
    take them at once).
    """

    # seconds a stop waits for the read under way to come back before cutting its connection
    stop_read_timeout = 5.0

    def __init__(self, bus: Bus, group: str, handler: Handler, types: Sequence[str],
                 name: Optional[str] = None, concurrency: int = 64,
                 claim_interval: Optional[float] = None, drain_timeout: float = 10.0,
                 linger: float = 0.0, decode: Callable[[str], Any] = from_stored,
                 before_dispatch: Optional[Callable[[], Deferred[Any]]] = None):
        self.bus = bus
        # called after each read and before its entries are handled: whatever the handler's view
        # must catch up with (changes made before the entries were read) is caught up with then
        self.before_dispatch = before_dispatch
        # how an entry's stored text becomes what the handler gets (ValueError: it cannot);
        # an event by default, something else for streams of other work (outgoing mail)
        self.decode = decode
        self.group = group
        self.handler = handler
        self.types = tuple(types)
        self.streams = [stream_key(t) for t in self.types]
        self.consumer_name = name or _consumer_name()
        self.concurrency = concurrency
        self.claim_interval = claim_interval or max(bus.claim_idle / 3, 0.05)
        self.beat_interval = bus.consumer_timeout / BEATS_PER_TIMEOUT if bus.consumer_timeout else None
        self.drain_timeout = drain_timeout
        # after a read that did not fill the room, wait this long before the next one: fewer,
        # larger reads for consumers to whom a few milliseconds do not matter
        self.linger = linger
        self._lingering: Optional[Deferred[None]] = None
        self.inflight: dict[tuple[str, str], Deferred[Any]] = {}
        self._last_error: dict[tuple[str, str], str] = {}
        self._room: Optional[Deferred[None]] = None
        self._loop: Optional[Deferred[None]] = None
        self._reclaimer: Optional[task.LoopingCall] = None
        self._beater: Optional[task.LoopingCall] = None
        self._beats_since: Optional[float] = None  # when the current unbroken run of beats began
        self._beat_failed = False  # whether a beat has failed since the start
        # whether the group may hold entries for this consumer that nobody here handles: set when
        # the bus fails it, cleared by the beat that takes them back
        self._lost_track = False
        self._catching_up: set[tuple[str, str]] = set()  # read or claimed, waiting for before_dispatch
        self._busy: set[Deferred[Any]] = set()  # beats, reclaims and hand-outs under way: a stop waits for them
        self._pauses: set[Deferred[None]] = set()
        self._drain_waiters: list[Deferred[None]] = []
        self._ready = False
        self._ready_waiters: list[Deferred[None]] = []
        self.handled = 0  # entries handled and acknowledged since the start
        # handled, but the acknowledgement could not be sent (the bus was away): sent again at the
        # next beat or reclaim, rather than handled again by whoever claims the entry
        self.owed_acks: set[tuple[str, str]] = set()
        self._handled_waiters: list[tuple[int, Deferred[int]]] = []

    # -- lifetime ---------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._loop = self._run()
        self._loop.addErrback(lambda f: log.failure("consumer {name} stopped", f, name=self.consumer_name))
        self._reclaimer = task.LoopingCall(self._reclaim_logged)
        self._reclaimer.clock = self.bus.clock
        self._reclaimer.start(self.claim_interval, now=False)
        if self.beat_interval is not None:
            self._beater = task.LoopingCall(self._beat_logged)
            self._beater.clock = self.bus.clock
            self._beater.start(self.beat_interval, now=False)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        for timer in (self._reclaimer, self._beater):
            if timer is not None and timer.running:
                timer.stop()
        if self._lingering is not None:
            self._lingering.cancel()
        for pause in list(self._pauses):
            pause.cancel()
        room, self._room = self._room, None
        if room is not None:
            room.callback(None)
        # the read under way comes back now; what it brings is handled like the rest
        try:
            yield self._interrupt_read()
        except Exception as exc:
            log.warn("consumer {name} cannot interrupt its read ({error}); closing its connection",
                     name=self.consumer_name, error=exc)
            yield self._stop_reading()
        if self._loop is not None and not (yield self._within(self._loop, self.stop_read_timeout)):
            log.warn("consumer {name}: its read did not come back in {seconds} s; closing its connection",
                     name=self.consumer_name, seconds=self.stop_read_timeout)
            yield self._stop_reading()
        while self._busy:  # a beat under way may yet hand out what it claimed
            yield defer.DeferredList(list(self._busy))
        if self.inflight and self.drain_timeout > 0:
            # running handlers finish and their entries are acknowledged; what does not finish in
            # time stays pending, for the others
            if not (yield self._within(self._drained(), self.drain_timeout)):
                log.warn("consumer {name} stopped with {count} entries unfinished; they are left to "
                         "the other consumers of {group}", name=self.consumer_name, count=len(self.inflight),
                         group=self.group)
                for d in list(self.inflight.values()):
                    if d is not _TAKEN:
                        d.cancel()
        yield self._send_owed_acks()
        yield self._stop_reading()
        try:
            left = yield self._leave()
        except Exception as exc:
            log.warn("consumer {name} could not leave its group {group} ({error}); the others remove it "
                     "once its heartbeat lapses", name=self.consumer_name, group=self.group, error=exc)
        else:
            if left:
                log.info("consumer {name} left entries pending on {streams} stream(s) of {group}; "
                         "the other consumers take them over", name=self.consumer_name, streams=left,
                         group=self.group)

    def _within(self, d: Deferred[Any], seconds: float) -> Deferred[bool]:
        """Fires True once ``d`` has fired, or False after ``seconds`` on the bus's clock."""
        done: Deferred[bool] = Deferred()
        timer: list[Any] = []

        def fired(result: Any) -> Any:
            if timer and timer[0].active():
                timer[0].cancel()
            if not done.called:
                done.callback(True)
            return result

        d.addBoth(fired)
        if not done.called:
            timer.append(self.bus.clock.callLater(seconds, done.callback, False))
        return done

    def _pause(self, seconds: float) -> Deferred[None]:
        """Fires after ``seconds``, or at once when the consumer stops."""
        d = task.deferLater(self.bus.clock, seconds, lambda: None)
        self._pauses.add(d)
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        d.addBoth(lambda _: self._pauses.discard(d))
        return d

    def _busy_with(self, d: Deferred[_T]) -> Deferred[_T]:
        self._busy.add(d)

        def done(result: Any) -> Any:
            self._busy.discard(d)
            return result

        return d.addBoth(done)

    # -- delivery -----------------------------------------------------------
    def when_ready(self) -> Deferred[None]:
        """Fires once the consumer is about to read: its group exists and its first beat is in."""
        if self._ready:
            return defer.succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._ready_waiters.remove(d))
        self._ready_waiters.append(d)
        return d

    @inlineCallbacks
    def _run(self) -> Generator[Deferred[Any], Any, None]:
        yield self._get_ready()
        if self.running:
            self._ready = True
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(None)
        while self.running:
            yield self._wait_for_room()
            if not self.running:
                break
            try:
                entries = yield self._read(self.concurrency - len(self.inflight))
            except Exception as exc:
                if not self.running:
                    break
                # unless the bus says it lost Redis, once for all its consumers
                self.bus.unless_lost(partial(log.warn, "consumer {name} cannot read: {error}; retrying",
                                             name=self.consumer_name, error=exc))
                self._lost_track = True  # Redis may have delivered what it read before the connection went
                yield self._pause(1.0)
                yield self._get_ready()
                continue
            if entries and self.before_dispatch is not None:
                if not (yield self._caught_up([(stream, entry_id) for stream, entry_id, _ in entries])):
                    break  # stopping: the entries stay pending, for whoever reads next
            # entries read while stopping are handled too: they were handed to this consumer
            for stream, entry_id, raw in entries:
                self._dispatch(stream, entry_id, raw, 1)
            if self.linger and len(entries) < self.concurrency and self.running:
                self._lingering = task.deferLater(self.bus.clock, self.linger, lambda: None)
                try:
                    yield self._lingering
                except defer.CancelledError:
                    break
                finally:
                    self._lingering = None

    @inlineCallbacks
    def _get_ready(self) -> Generator[Deferred[Any], Any, None]:
        yield self._prepare()
        # the first beat comes before the first read: until then the others take this consumer for dead
        while self.running and self.beat_interval is not None:
            try:
                yield self.take_over()
                return
            except Exception as exc:
                log.warn("consumer {name} cannot beat: {error}; retrying", name=self.consumer_name, error=exc)
                yield self._pause(1.0)

    @inlineCallbacks
    def _caught_up(self, keys: list[tuple[str, str]]) -> Generator[Deferred[bool], bool, bool]:
        """Fires True once ``before_dispatch`` has succeeded, retrying while it fails; False when stopping.

        Meanwhile the entries of ``keys`` are held here, waiting for it.
        """
        self._catching_up.update(keys)
        try:
            return (yield self._catch_up())
        finally:
            self._catching_up.difference_update(keys)

    @inlineCallbacks
    def _catch_up(self) -> Generator[Deferred[Any], Any, bool]:
        assert self.before_dispatch is not None
        while True:
            try:
                yield self.before_dispatch()
                return True
            except Exception as exc:
                if not self.running:
                    log.warn("consumer {name} stops before its view is up to date ({error}); what it read "
                             "stays pending", name=self.consumer_name, error=exc)
                    return False
                log.warn("consumer {name} cannot bring its view up to date: {error}; retrying",
                         name=self.consumer_name, error=exc)
                yield self._pause(1.0)

    @inlineCallbacks
    def _wait_for_room(self) -> Generator[Deferred[None], None, None]:
        # taken-over and reclaimed entries come on top of what was read: one release need not
        # make room, and a read for a negative count would take everything (Redis: no COUNT)
        while self.running and len(self.inflight) >= self.concurrency:
            self._room = Deferred()
            yield self._room

    def _dispatch(self, stream: str, entry_id: str, raw: Optional[str], deliveries: int) -> None:
        key = (stream, entry_id)
        if key in self.inflight:
            return
        try:
            event = self.decode(raw) if raw is not None else None
        except ValueError:
            event = None
        if event is None:
            # no retry can make an undecodable entry decodable
            self._dead_letter_logged(stream, entry_id, raw, deliveries, "the entry holds no valid event")
            return
        self.inflight[key] = _TAKEN  # before the handler runs: it may re-enter
        try:
            result = self.handler(event, Delivery(stream, entry_id, deliveries))
        except Exception:
            self._failed(Failure(), key)
            return
        if isinstance(result, Deferred):
            self.inflight[key] = result
            result.addCallbacks(self._handler_done, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        else:  # most handlers finish at once: no Deferred for the handler then
            self._handler_done(None, key)

    def _handler_done(self, _: Any, key: tuple[str, str]) -> None:
        acked = self._ack(*key)
        self.inflight[key] = acked
        acked.addCallbacks(self._handled, self._ack_failed, callbackArgs=(key,), errbackArgs=(key,))

    def _ack_failed(self, failure: Failure, key: tuple[str, str]) -> None:
        if not failure.check(BusUnavailable):
            return self._failed(failure, key)
        if not self.owed_acks:
            log.warn("consumer {name}: cannot acknowledge what it handled ({error}); it will when the bus is back",
                     name=self.consumer_name, error=failure.getErrorMessage())
        self.owed_acks.add(key)
        self._release(key)
        return None

    def _send_owed_acks(self) -> Deferred[None]:
        """Acknowledge again what was handled while the bus was away; fires when tried."""
        owed = [key for key in self.owed_acks if key not in self.inflight]
        if not owed:
            return defer.succeed(None)

        def acked(_: Any, key: tuple[str, str]) -> None:
            if key in self.owed_acks:
                self.owed_acks.discard(key)
                self.handled += 1
                if self._handled_waiters:
                    self._wake_handled()

        sent = [self._ack(*key).addCallback(acked, key) for key in owed]
        d = defer.gatherResults(sent, consumeErrors=True).addCallback(
            lambda _: log.info("consumer {name}: acknowledged {count} entries handled while the bus "
                               "was away", name=self.consumer_name, count=len(owed)))
        return d.addErrback(lambda _: None)  # still away: the next beat tries again

    def _handled(self, _: Any, key: tuple[str, str]) -> None:
        self._last_error.pop(key, None)
        self.handled += 1
        self._release(key)
        if self._handled_waiters:
            self._wake_handled()

    def when_handled(self, count: int) -> Deferred[int]:
        """Fires with ``handled`` once this consumer has handled and acknowledged ``count`` entries in all."""
        if self.handled >= count:
            return defer.succeed(self.handled)
        d: Deferred[int] = Deferred(lambda d: self._handled_waiters.remove((count, d)))
        self._handled_waiters.append((count, d))
        return d

    def _wake_handled(self) -> None:
        due = [(count, d) for count, d in self._handled_waiters if count <= self.handled]
        for entry in due:
            self._handled_waiters.remove(entry)
        for _, d in due:
            d.callback(self.handled)

    def _failed(self, failure: Failure, key: tuple[str, str]) -> None:
        self._last_error[key] = failure.getErrorMessage()[:500]
        if failure.check(BusUnavailable):
            # the bus, not the entry, failed: handled again once the bus is back (while stopping,
            # it stays pending for whoever comes next)
            if self.running:
                self._lost_track = True
            log.warn("consumer {name}: handling {stream} {id} met the bus away ({error}); it stays pending "
                     "and is handed out again once the bus is back", name=self.consumer_name, stream=key[0],
                     id=key[1], error=failure.getErrorMessage())
        else:
            log.failure("consumer {name}: handling {stream} {id} failed; it stays pending",
                        failure, name=self.consumer_name, stream=key[0], id=key[1])
        self._release(key)

    def _release(self, key: tuple[str, str]) -> None:
        self.inflight.pop(key, None)
        room, self._room = self._room, None
        if room is not None:
            room.callback(None)
        if not self.inflight and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def _drained(self) -> Deferred[None]:
        """Fires once nothing is in flight: every entry handed out is acknowledged, or failed."""
        if not self.inflight:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    # -- reclaiming ---------------------------------------------------------
    def _reclaim_logged(self) -> Deferred[Optional[int]]:
        return self.reclaim().addErrback(self._reclaim_failed)

    def _reclaim_failed(self, failure: Failure) -> None:
        self._lost_track = True  # a claim whose reply was lost leaves its entries with this consumer
        log.warn("consumer {name}: reclaim failed: {error}", name=self.consumer_name,
                 error=failure.getErrorMessage())

    def reclaim(self) -> Deferred[int]:
        """Take over entries idle past ``claim_idle``; dead-letter those delivered too often.

        Fires with the number of entries taken over.
        """
        return self._busy_with(self._reclaim())

    @inlineCallbacks
    def _reclaim(self) -> Generator[Deferred[Any], Any, int]:
        yield self._send_owed_acks()
        if self.inflight:
            yield self._touch(list(self.inflight))
        claimed = yield self._claim(self.bus.claim_idle)
        return self._hand_out(claimed)

    def _beat_logged(self) -> Deferred[Optional[int]]:
        d = self.take_over()
        return d.addErrback(lambda f: self.bus.unless_lost(
            partial(log.warn, "consumer {name}: heartbeat failed: {error}", name=self.consumer_name,
                    error=f.getErrorMessage())))

    def take_over(self) -> Deferred[int]:
        """Beat; then take over the entries of this group's consumers whose heartbeat has lapsed,
        and remove those consumers from the group. Fires with the number of entries taken over
        (0 on a bus inside one process, where there are no heartbeats)."""
        if self.beat_interval is None:
            return defer.succeed(0)
        return self._busy_with(self._take_over())

    @inlineCallbacks
    def _take_over(self) -> Generator[Deferred[Any], Any, int]:
        timeout = self.bus.consumer_timeout
        assert timeout is not None
        now = self.bus.clock.seconds()
        # After a failed beat (Redis away, or this process cut off from it) the others' beats may
        # have lapsed as well as this one's: they are judged once they have all had a whole
        # timeout to beat again, so that the first consumer back does not take all for dead.
        judge = self.running and (not self._beat_failed or (
            self._beats_since is not None and now - self._beats_since >= timeout))
        taken = 0
        while True:
            try:
                claimed = yield self._beat(judge, TAKEOVER_BATCH)
            except Exception:
                self._beat_failed = True
                self._beats_since = None
                self._lost_track = True  # what a beat claims is lost with its reply
                raise
            if self._beats_since is None:
                self._beats_since = now
            if self.owed_acks:
                yield self._send_owed_acks()
            if claimed:
                log.info("consumer {name} took over {count} entries of {group} from consumers whose "
                         "heartbeat lapsed", name=self.consumer_name, count=len(claimed), group=self.group)
            taken += self._hand_out(claimed)
            if len(claimed) < TAKEOVER_BATCH:
                break
        if self._lost_track and self.running:
            taken += yield self._take_back()
        return taken

    @inlineCallbacks
    def _take_back(self) -> Generator[Deferred[Any], Any, int]:
        """Claim again, and hand out, what the group holds for this consumer and nobody here handles."""
        self._lost_track = False
        try:
            claimed = yield self._claim_own(self._held())
        except Exception as exc:
            self._lost_track = True
            log.warn("consumer {name} cannot take back what {group} holds for it ({error}); the next beat "
                     "tries again", name=self.consumer_name, group=self.group, error=exc)
            return 0
        taken = self._hand_out(claimed)
        if taken:
            log.info("consumer {name} took back {count} entries of {group} it held while the bus was away",
                     name=self.consumer_name, count=taken, group=self.group)
        return taken

    def _held(self) -> set[tuple[str, str]]:
        """The entries this consumer has in hand: handled, owed an acknowledgement, or waiting to be handled."""
        return self.inflight.keys() | self.owed_acks | self._catching_up

    def _hand_out(self, claimed: list[ClaimedEntry]) -> int:
        """Hand claimed entries to the handler (or to ``ckpt.dead``); returns how many were new here."""
        held = self._held()
        fresh = [entry for entry in claimed if entry[:2] not in held]
        if fresh:
            self._busy_with(self._dispatch_claimed(fresh)).addErrback(
                lambda f: log.failure("consumer {name}: handing out claimed entries failed", f,
                                      name=self.consumer_name))
        return len(fresh)

    @inlineCallbacks
    def _dispatch_claimed(self, claimed: list[ClaimedEntry]) -> Generator[Deferred[Any], Any, None]:
        if self.before_dispatch is not None and not (yield self._caught_up([entry[:2] for entry in claimed])):
            return  # stopping: they stay pending, for the others once this consumer has left
        for stream, entry_id, raw, deliveries in claimed:
            if deliveries > self.bus.max_deliveries:
                error = self._last_error.pop((stream, entry_id), "handler kept failing")
                self._dead_letter_logged(stream, entry_id, raw, deliveries, error)
            else:
                self._dispatch(stream, entry_id, raw, deliveries)

    def _dead_letter_logged(self, stream: str, entry_id: str, raw: Optional[str],
                            deliveries: int, error: str) -> None:
        log.error("consumer {name}: moved {stream} {id} to {dead} after {deliveries} deliveries: {error}",
                  name=self.consumer_name, stream=stream, id=entry_id, dead=DEAD_LETTER_STREAM,
                  deliveries=deliveries, error=error)
        d = self._dead_letter(stream, entry_id, raw or "", deliveries, error)
        d.addErrback(lambda f: log.warn("dead-lettering {id} failed: {error}", id=entry_id,
                                        error=f.getErrorMessage()))

    def _dead_letter_fields(self, stream: str, entry_id: str, raw: str, deliveries: int,
                            error: str) -> list[str]:
        return ["stream", stream, "id", entry_id, "group", self.group,
                "deliveries", str(deliveries), "error", error, "event", raw]

    # -- storage, per bus ------------------------------------------------------
    def _prepare(self) -> Deferred[None]:
        raise NotImplementedError

    def _read(self, count: int) -> Deferred[list[ReadEntry]]:
        """Fires with new ``[(stream, id, raw)]``, waiting a while when there are none."""
        raise NotImplementedError

    def _stop_reading(self) -> Deferred[None]:
        raise NotImplementedError

    def _ack(self, stream: str, entry_id: str) -> Deferred[int]:
        raise NotImplementedError

    def _interrupt_read(self) -> Deferred[None]:
        """Make the read under way (if any) come back now, with whatever it has."""
        raise NotImplementedError

    def _touch(self, keys: list[tuple[str, str]]) -> Deferred[Any]:
        """Reset the idle time of entries this consumer holds, so that ``claim_idle`` does not take them."""
        raise NotImplementedError

    def _beat(self, judge: int, limit: int) -> Deferred[list[ClaimedEntry]]:
        """Refresh this consumer's heartbeat; with ``judge``, then claim up to ``limit`` entries of the
        group's consumers whose heartbeat has lapsed and remove those that hold no more.

        Fires with ``[(stream, id, raw, deliveries)]`` now owned by this consumer.
        """
        raise NotImplementedError

    def _leave(self) -> Deferred[int]:
        """End the heartbeat and leave the group on every stream where nothing is pending.

        Fires with the number of streams on which entries stay pending (for the others to take).
        """
        raise NotImplementedError

    def _claim(self, min_idle: float) -> Deferred[list[ClaimedEntry]]:
        """Fires with ``[(stream, id, raw, deliveries)]`` now owned by this consumer."""
        raise NotImplementedError

    def _claim_own(self, held: set[tuple[str, str]]) -> Deferred[list[ClaimedEntry]]:
        """Claim anew the entries pending for this consumer, except ``held`` (they stay as they are);
        fires with ``[(stream, id, raw, deliveries)]``. Only a bus with heartbeats is asked."""
        raise NotImplementedError

    def _dead_letter(self, stream: str, entry_id: str, raw: str, deliveries: int, error: str) -> Deferred[Any]:
        raise NotImplementedError
