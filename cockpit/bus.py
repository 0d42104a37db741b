"""The event bus: live fan-out, a durable log and consumer groups.

``RedisBus`` is the real thing (txredisapi 1.6); ``MemoryBus`` gives the same
interface and semantics inside one process for the embedded default. Both pass
one shared test suite.

Redis names (DESIGN §4):
- ``PUBLISH ckpt.<type> <json>`` for live watchers, and
- ``XADD ckpt.<type> MAXLEN ~ N * event <json>`` for the durable log,
  both in one MULTI/EXEC;
- consumer groups (``ays``) read with XREADGROUP, reclaim with XAUTOCLAIM, and
  move an entry delivered too often to the stream ``ckpt.dead``.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.config import RedisSection
from cockpit.events import EVENT_TYPES, Event, from_stored

log = Logger()

STREAM_PREFIX = "ckpt."
DEAD_LETTER_STREAM = "ckpt.dead"
AYS_GROUP = "ays"


def stream_key(event_type: str) -> str:
    """The channel and the stream of one event type: ``ckpt.<type>``."""
    return STREAM_PREFIX + event_type


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def cursor(entry_id: str, event_type: str) -> str:
    """A position in the merged log of every type: streams' ids can tie across types."""
    return f"{entry_id}/{event_type}"


def _order(entry_id: str, event_type: str) -> tuple[int, int, int]:
    return (*_id_key(entry_id), EVENT_TYPES.index(event_type) if event_type in EVENT_TYPES else len(EVENT_TYPES))


def _parse_before(before: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``id`` or ``id/type`` -> the order key entries must be below; ValueError when malformed."""
    if not before:
        return None
    entry_id, _, event_type = before.partition("/")
    ms, dash, seq = entry_id.partition("-")
    if not ms.isdigit() or (dash and not seq.isdigit()) or (event_type and event_type not in EVENT_TYPES):
        raise ValueError(f"before: expected a position such as 1700000000000-0 or 1700000000000-0/alarm, got {before!r}")
    return _order(entry_id, event_type or "~")


class BusUnavailable(Exception):
    """The bus cannot take the event now; ingress answers 503 (REST) or 451 (SMTP)."""


@dataclass(frozen=True)
class Delivery:
    """Where a consumed event came from and how often it has been handed out."""

    stream: str
    id: str
    deliveries: int


Handler = Callable[[Event, Delivery], Any]


class Subscription:
    """A live subscription; ``cancel()`` ends it."""

    def __init__(self, bus: "Bus", callback: Callable[[Event], Any], types: frozenset[str]):
        self._bus = bus
        self.callback = callback
        self.types = types
        self._ended: list[Deferred] = []

    def cancel(self) -> None:
        self._bus._subscriptions.discard(self)
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)

    def when_cancelled(self) -> Deferred:
        """Fires once the subscription has ended (at once if it has)."""
        if self not in self._bus._subscriptions:
            return defer.succeed(None)
        d = Deferred()
        self._ended.append(d)
        return d


class Bus(Service):
    """What every bus offers. Implementations: :class:`RedisBus`, :class:`MemoryBus`."""

    kind = "abstract"

    def __init__(self, stream_maxlen: int = 100000, max_deliveries: int = 5,
                 claim_idle: float = 60.0, clock: Optional[IReactorTime] = None):
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock = clock
        self.stream_maxlen = stream_maxlen
        self.max_deliveries = max_deliveries
        self.claim_idle = claim_idle
        self._subscriptions: set[Subscription] = set()

    # -- publishing -------------------------------------------------------
    def publish(self, event: Event) -> Deferred:
        """Log and fan out ``event``; fires with its stream entry id, or fails with BusUnavailable."""
        raise NotImplementedError

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

    def when_connected(self) -> Deferred:
        """Fires once the bus can take events (at once for a bus inside this process)."""
        return defer.succeed(None)

    def when_live(self) -> Deferred:
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
        to ``ckpt.dead`` after ``max_deliveries`` deliveries.
        """
        raise NotImplementedError

    def recent(self, event_type: Optional[str] = None, limit: int = 50,
               before: Optional[str] = None) -> Deferred:
        """Fires with ``[(entry_id, event)]`` from the durable log, newest first."""
        raise NotImplementedError

    def dead_letters(self, limit: int = 50) -> Deferred:
        """Fires with ``[(entry_id, fields)]`` of ``ckpt.dead``, newest first."""
        raise NotImplementedError

    def pending(self, group: str, types: Sequence[str] = EVENT_TYPES) -> Deferred:
        """Fires with how many entries ``group`` has been handed and not acknowledged."""
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- marks shared by every process on the bus -----------------------------
    def remember(self, key: str, value: str, ttl: float) -> Deferred:
        """Keep ``value`` under ``key`` (``ckpt.``...) for ``ttl`` seconds unless it holds one already.

        Fires True when stored, False when the key already held a value (which is kept).
        """
        raise NotImplementedError

    def recall(self, key: str) -> Deferred:
        """Fires with the value remembered under ``key``, or None (never stored, or its ttl has passed)."""
        raise NotImplementedError


def _mark_key(key: str) -> str:
    if not key.startswith(STREAM_PREFIX):
        raise ValueError(f"a mark's key starts with {STREAM_PREFIX!r}, got {key!r}")
    return key


_TAKEN: Deferred = defer.succeed(None)


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Consumer(Service):
    """The delivery logic both buses share; subclasses only talk to their storage."""

    def __init__(self, bus: Bus, group: str, handler: Handler, types: Sequence[str],
                 name: Optional[str] = None, concurrency: int = 64,
                 claim_interval: Optional[float] = None, drain_timeout: float = 10.0,
                 linger: float = 0.0, decode: Callable[[str], Any] = from_stored):
        self.bus = bus
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
        self.drain_timeout = drain_timeout
        # after a read that did not fill the room, wait this long before the next one: fewer,
        # larger reads for consumers to whom a few milliseconds do not matter
        self.linger = linger
        self._lingering: Optional[Deferred] = None
        self.inflight: dict[tuple[str, str], Deferred] = {}
        self._last_error: dict[tuple[str, str], str] = {}
        self._room: Optional[Deferred] = None
        self._loop: Optional[Deferred] = None
        self._reclaimer: Optional[task.LoopingCall] = None
        self.handled = 0  # entries handled and acknowledged since the start
        self._handled_waiters: list[tuple[int, Deferred]] = []

    # -- lifetime ---------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._loop = self._run()
        self._loop.addErrback(lambda f: log.failure("consumer {name} stopped", f, name=self.consumer_name))
        self._reclaimer = task.LoopingCall(self._reclaim_logged)
        self._reclaimer.clock = self.bus.clock
        self._reclaimer.start(self.claim_interval, now=False)

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._reclaimer and self._reclaimer.running:
            self._reclaimer.stop()
        if self._lingering is not None:
            self._lingering.cancel()
        yield self._stop_reading()
        if self.inflight and self.drain_timeout > 0:
            # let running handlers finish and ack; what does not finish stays pending for others
            pending = defer.DeferredList([d for d in self.inflight.values() if d is not _TAKEN],
                                         consumeErrors=True)
            timeout = self.bus.clock.callLater(self.drain_timeout, pending.cancel)
            try:
                yield pending
            except defer.CancelledError:
                log.warn("consumer {name} stopped with {count} entries unfinished; they will be reclaimed",
                         name=self.consumer_name, count=len(self.inflight))
            if timeout.active():
                timeout.cancel()

    # -- delivery -----------------------------------------------------------
    @inlineCallbacks
    def _run(self):
        yield self._prepare()
        while self.running:
            yield self._wait_for_room()
            if not self.running:
                break
            try:
                entries = yield self._read(self.concurrency - len(self.inflight))
            except Exception as exc:
                if not self.running:
                    break
                log.warn("consumer {name} cannot read: {error}; retrying", name=self.consumer_name, error=exc)
                yield task.deferLater(self.bus.clock, 1.0, lambda: None)
                yield self._prepare()
                continue
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

    def _wait_for_room(self) -> Deferred:
        if len(self.inflight) < self.concurrency:
            return defer.succeed(None)
        self._room = Deferred()
        return self._room

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
        acked.addCallbacks(self._handled, self._failed, callbackArgs=(key,), errbackArgs=(key,))

    def _handled(self, _: Any, key: tuple[str, str]) -> None:
        self._last_error.pop(key, None)
        self.handled += 1
        self._release(key)
        if self._handled_waiters:
            self._wake_handled()

    def when_handled(self, count: int) -> Deferred:
        """Fires with ``handled`` once this consumer has handled and acknowledged ``count`` entries in all."""
        if self.handled >= count:
            return defer.succeed(self.handled)
        d: Deferred = Deferred(lambda d: self._handled_waiters.remove((count, d)))
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
            log.warn("consumer {name}: cannot acknowledge {stream} {id} ({error}); it stays pending",
                     name=self.consumer_name, stream=key[0], id=key[1], error=failure.getErrorMessage())
        else:
            log.failure("consumer {name}: handling {stream} {id} failed; it stays pending",
                        failure, name=self.consumer_name, stream=key[0], id=key[1])
        self._release(key)

    def _release(self, key: tuple[str, str]) -> None:
        self.inflight.pop(key, None)
        room, self._room = self._room, None
        if room is not None:
            room.callback(None)

    # -- reclaiming ---------------------------------------------------------
    def _reclaim_logged(self) -> Deferred:
        d = self.reclaim()
        d.addErrback(lambda f: log.warn("consumer {name}: reclaim failed: {error}",
                                        name=self.consumer_name, error=f.getErrorMessage()))
        return d

    @inlineCallbacks
    def reclaim(self):
        """Take over entries idle past ``claim_idle``; dead-letter those delivered too often.

        Fires with the number of entries taken over.
        """
        if self.inflight:
            yield self._heartbeat(list(self.inflight))
        claimed = yield self._claim(self.bus.claim_idle)
        taken = 0
        for stream, entry_id, raw, deliveries in claimed:
            if (stream, entry_id) in self.inflight:
                continue
            taken += 1
            if deliveries > self.bus.max_deliveries:
                error = self._last_error.pop((stream, entry_id), "handler kept failing")
                self._dead_letter_logged(stream, entry_id, raw, deliveries, error)
            else:
                self._dispatch(stream, entry_id, raw, deliveries)
        return taken

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
    def _prepare(self) -> Deferred:
        raise NotImplementedError

    def _read(self, count: int) -> Deferred:
        """Fires with new ``[(stream, id, raw)]``, waiting a while when there are none."""
        raise NotImplementedError

    def _stop_reading(self) -> Deferred:
        raise NotImplementedError

    def _ack(self, stream: str, entry_id: str) -> Deferred:
        raise NotImplementedError

    def _heartbeat(self, keys: list[tuple[str, str]]) -> Deferred:
        raise NotImplementedError

    def _claim(self, min_idle: float) -> Deferred:
        """Fires with ``[(stream, id, raw, deliveries)]`` now owned by this consumer."""
        raise NotImplementedError

    def _dead_letter(self, stream: str, entry_id: str, raw: str, deliveries: int, error: str) -> Deferred:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

def _fields(flat: Optional[list]) -> dict[str, str]:
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2]))


def encode_command(args: Sequence[Any]) -> bytes:
    """One command in the Redis protocol (RESP)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif not isinstance(arg, (bytes, bytearray)):
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


if txredisapi.hiredis is not None:
    class _CommandProtocol(txredisapi.HiredisProtocol):
        """Replies parsed and decoded by hiredis in C, handed on as they are.

        txredisapi's own transaction bookkeeping and per-element conversion are skipped:
        this bus never uses txredisapi's multi(), and convertNumbers is off anyway.
        """

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._reader = txredisapi.hiredis.Reader(
                protocolError=txredisapi.InvalidData, replyError=txredisapi.ResponseError,
                encoding="utf-8", errors="replace")

        def dataReceived(self, data, unpause=False):
            if data:
                self._reader.feed(data)
            gets, deliver = self._reader.gets, self.replyReceived
            reply = gets()
            while reply is not False:
                deliver(reply)
                reply = gets()
else:  # pragma: no cover - hiredis is a dependency; this keeps a broken install working
    _CommandProtocol = txredisapi.RedisProtocol


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"


class _LiveProtocol(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        d = super().connectionMade()
        # subscriptions do not survive a reconnect: make them on every connection
        self.whenConnected().addCallback(
            lambda proto: proto.subscribe([stream_key(t) for t in EVENT_TYPES])
        ).addCallback(lambda _: self.factory.bus._live_ready(True))
        return d

    def connectionLost(self, why):
        self.factory.bus._live_ready(False)
        return super().connectionLost(why)

    def messageReceived(self, pattern, channel, message):
        try:
            event = from_stored(message)
        except ValueError:
            log.warn("ignored an undecodable message on {channel}", channel=channel)
            return
        self.factory.bus._deliver_live(event)


class RedisBus(Bus):
    kind = "redis"

    def __init__(self, settings: RedisSection, clock: Optional[IReactorTime] = None,
                 reactor: Any = None):
        super().__init__(settings.stream_maxlen, settings.max_deliveries, settings.claim_idle, clock)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.settings = settings
        self._conn = settings.connection()
        self._maxlen = str(settings.stream_maxlen)
        self._factory: Optional[txredisapi.RedisFactory] = None
        self._live: Optional[txredisapi.SubscriberFactory] = None
        self._batch: list[tuple[str, bytes, Deferred]] = []
        self._flush_call = None
        self._encoded: dict[str, tuple[bytes, bytes]] = {}
        self._awaiting = 0  # replies owed on the command connection
        self._progress = 0.0  # when a reply last came (or the first owed one was asked for)
        self._watchdog: Optional[task.LoopingCall] = None
        self._live_subscribed = False
        self._live_waiters: list[Deferred] = []

    def __repr__(self) -> str:
        return f"<RedisBus {self.settings.redacted_url()}>"

    # -- connections ------------------------------------------------------
    def _endpoint(self):
        c = self._conn
        if c["path"]:
            return UNIXClientEndpoint(self.reactor, c["path"], timeout=self.settings.timeout)
        endpoint = HostnameEndpoint(self.reactor, c["host"], c["port"], timeout=self.settings.timeout)
        if c["tls"]:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(c["host"]), endpoint)
        return endpoint

    def connect(self) -> txredisapi.RedisFactory:
        """A new lazily connecting, self-reconnecting single connection to this bus's Redis.

        It sets no reply timer per command: the bus's watchdog times the command connection,
        and a blocking read waits as long as it asked to.
        """
        c = self._conn
        # no SELECT for database 0, where a connection starts anyway: txredisapi stops
        # reconnecting for good when a connection drops in the middle of its SELECT
        factory = txredisapi.RedisFactory(
            self.settings.redacted_url(), c["db"] or None, 1, isLazy=True,
            password=c["password"], username=c["username"], convertNumbers=False)
        factory.protocol = _CommandProtocol
        # a failed AUTH or SELECT fails this Deferred, which nobody else waits on; the
        # reconnecting connection reports its state through health
        factory.deferred.addErrback(lambda f: log.warn("Redis at {url}: {error}", url=self.settings.redacted_url(),
                                                       error=f.getErrorMessage()))
        self._tune(factory)
        factory.startConnecting(self._endpoint())
        return factory

    @staticmethod
    def _tune(factory: txredisapi.RedisFactory) -> None:
        # come back quickly after a Redis restart; ingress refuses meanwhile
        factory.initialDelay = 0.2
        factory.maxDelay = 2.0

    def startService(self) -> None:
        super().startService()
        # replies are timed by this one watchdog, not a timer per command
        self._factory = self.connect()
        self._watchdog = task.LoopingCall(self._watch)
        self._watchdog.clock = self.reactor
        self._watchdog.start(max(self.settings.timeout / 4, 0.05), now=False)
        if self._subscriptions:
            self._live_wanted()
        log.info("bus: Redis at {url}", url=self.settings.redacted_url())

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        factories = [f for f in (self._factory, self._live) if f is not None]
        self._factory = self._live = None
        self._fail_batch(BusUnavailable("the bus is stopping"))
        yield defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True)

    def _live_wanted(self) -> None:
        if self._live is None and self.running:
            c = self._conn
            factory = txredisapi.SubscriberFactory(isLazy=True)
            factory.protocol = _LiveProtocol
            factory.password, factory.username = c["password"], c["username"]
            factory.convertNumbers = False
            factory.bus = self
            self._tune(factory)
            factory.startConnecting(self._endpoint())
            self._live = factory

    def connection(self):
        """The connected protocol commands go to; raises BusUnavailable when there is none."""
        factory = self._factory
        if factory is not None:
            for proto in factory.pool:
                if proto.connected:
                    return proto
        raise BusUnavailable(f"Redis at {self.settings.redacted_url()} is not reachable")

    def execute(self, *args: Any) -> Deferred:
        """Run one command now, failing fast with BusUnavailable when Redis is away.

        A Redis error reply fails the Deferred with txredisapi.ResponseError.
        """
        try:
            proto = self.connection()
        except BusUnavailable as exc:
            return defer.fail(exc)
        reply = self._expect(proto, 1)
        proto.transport.write(encode_command(args))
        return reply.addCallback(self._reply)

    def _expect(self, proto: Any, replies: int) -> Deferred:
        """Wait for ``replies`` replies on ``proto``; fires with the last one (errors as values)."""
        queue = proto.replyQueue
        for _ in range(replies - 1):
            queue.get()
        if self._awaiting == 0:
            self._progress = self.reactor.seconds()
        self._awaiting += 1
        return queue.get().addBoth(self._replied)

    def _replied(self, value: Any) -> Any:
        self._awaiting -= 1
        self._progress = self.reactor.seconds()
        return value

    def transaction(self, *commands: Sequence[Any]) -> Deferred:
        """Run ``commands`` in one MULTI/EXEC; fires with EXEC's list of replies."""
        try:
            proto = self.connection()
        except BusUnavailable as exc:
            return defer.fail(exc)
        reply = self._expect(proto, len(commands) + 2)
        proto.transport.write(b"".join([_MULTI, *map(encode_command, commands), _EXEC]))
        return reply.addCallback(self._reply)

    def _reply(self, value: Any) -> Any:
        if isinstance(value, txredisapi.ConnectionError):
            raise BusUnavailable(f"Redis at {self.settings.redacted_url()} did not answer: {value}")
        if isinstance(value, Exception):
            raise value
        return value

    def _watch(self) -> None:
        """Abort a connection that has owed replies for longer than [redis] timeout: Redis hangs."""
        if self._awaiting and self.reactor.seconds() - self._progress > self.settings.timeout:
            log.warn("Redis at {url} gave no reply for {timeout}s; reconnecting",
                     url=self.settings.redacted_url(), timeout=self.settings.timeout)
            self._progress = self.reactor.seconds()
            for proto in list(self._factory.pool if self._factory else ()):
                proto.transport.abortConnection()

    # -- publishing ---------------------------------------------------------
    def publish(self, event: Event) -> Deferred:
        try:
            self.connection()
        except BusUnavailable as exc:
            return defer.fail(exc)
        d = Deferred()
        self._batch.append((stream_key(event.type), event.to_json(), d))
        if self._flush_call is None:
            # events published in the same reactor turn share one MULTI/EXEC and one write
            self._flush_call = self.reactor.callLater(0, self._flush)
        return d

    def _fail_batch(self, exc: Exception) -> None:
        batch, self._batch = self._batch, []
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        for _, _, d in batch:
            d.errback(exc)

    def _flush(self) -> None:
        self._flush_call = None
        batch, self._batch = self._batch, []
        try:
            proto = self.connection()
        except BusUnavailable as exc:
            for _, _, d in batch:
                d.errback(exc)
            return
        # The whole batch is one write: MULTI, XADD+PUBLISH per event, EXEC. Encoded here,
        # not command by command, because per-command Deferreds and timers cost more than
        # Redis spends on the commands themselves.
        parts = [_MULTI]
        for key, raw, _ in batch:
            xadd, publish = self._prefixes(key)
            size = b"$%d\r\n" % len(raw)
            parts += (xadd, size, raw, b"\r\n", publish, size, raw, b"\r\n")
        parts.append(_EXEC)
        # +OK and +QUEUED replies are passed over: EXEC reports all that matters
        result = self._expect(proto, 2 * len(batch) + 2)
        proto.transport.write(b"".join(parts))
        result.addCallback(self._committed, batch)

    def _prefixes(self, key: str) -> tuple[bytes, bytes]:
        prefixes = self._encoded.get(key)
        if prefixes is None:
            k = key.encode()
            maxlen = self._maxlen.encode()
            xadd = b"*8\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%s\r\n" \
                   b"$1\r\n*\r\n$5\r\nevent\r\n" % (len(k), k, len(maxlen), maxlen)
            publish = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(k), k)
            prefixes = self._encoded[key] = (xadd, publish)
        return prefixes

    def _committed(self, replies: Any, batch: list) -> None:
        if isinstance(replies, txredisapi.ConnectionError):
            return self._not_committed(Failure(replies), batch)
        if not isinstance(replies, list):
            # EXECABORT (or no transaction at all): nothing was stored
            return self._not_committed(Failure(txredisapi.ResponseError(str(replies))), batch)
        for i, (_, _, d) in enumerate(batch):
            entry_id = replies[2 * i]
            if isinstance(entry_id, Exception):
                d.errback(BusUnavailable(f"Redis refused the event: {entry_id}"))
            else:
                d.callback(entry_id)

    def _not_committed(self, failure: Failure, batch: list) -> None:
        if failure.check(txredisapi.ConnectionError):
            exc = BusUnavailable(f"Redis at {self.settings.redacted_url()} did not answer: "
                                 f"{failure.getErrorMessage()}")
        else:
            exc = BusUnavailable(f"Redis refused the events: {failure.getErrorMessage()}")
        for _, _, d in batch:
            d.errback(exc)

    # -- reading ------------------------------------------------------------------
    def consumer(self, group, handler, types=EVENT_TYPES, name=None, **options):
        return RedisConsumer(self, group, handler, types, name, **options)

    @inlineCallbacks
    def recent(self, event_type=None, limit=50, before=None):
        types = [event_type] if event_type else list(EVENT_TYPES)
        bound = _parse_before(before)
        commands = []
        for t in types:
            high = "+"
            if bound is not None:
                entry_id = f"{bound[0]}-{bound[1]}"
                # ties on the id are ordered by type: earlier types still include the id itself
                high = entry_id if _order(entry_id, t) < bound else f"({entry_id}"
                if high == "(0-0":
                    continue  # nothing is below the first possible id (and Redis refuses the range)
            commands.append(self.execute("XREVRANGE", stream_key(t), high, "-", "COUNT", str(limit)))
        replies = yield defer.gatherResults(commands, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)
        entries = []
        for reply in replies:
            for entry_id, flat in reply or []:
                raw = _fields(flat).get("event")
                if raw is None:
                    continue
                try:
                    entries.append((entry_id, from_stored(raw)))
                except ValueError:
                    log.warn("skipped an undecodable entry {id}", id=entry_id)
        entries.sort(key=lambda item: _order(item[0], item[1].type), reverse=True)
        return entries[:limit]

    @inlineCallbacks
    def dead_letters(self, limit=50):
        reply = yield self.execute("XREVRANGE", DEAD_LETTER_STREAM, "+", "-", "COUNT", str(limit))
        return [(entry_id, _fields(flat)) for entry_id, flat in reply or []]

    def when_connected(self) -> Deferred:
        """Fires once commands can be sent."""
        # the pool hands a connection to waiters a moment before it lists it as its own
        return self._factory.getConnection(peek=True).addCallback(
            lambda _: task.deferLater(self.reactor, 0, lambda: None))

    def when_disconnected(self) -> Deferred:
        """Fires once the command connection is gone (now, if there is none)."""
        try:
            return self.connection().whenDisconnected().addCallback(lambda _: None)
        except BusUnavailable:
            return defer.succeed(None)

    def when_live(self) -> Deferred:
        """Fires once live subscriptions are in place on the current connection."""
        if self._live_subscribed:
            return defer.succeed(None)
        d = Deferred()
        self._live_waiters.append(d)
        return d

    def _live_ready(self, subscribed: bool) -> None:
        self._live_subscribed = subscribed
        if subscribed:
            waiters, self._live_waiters = self._live_waiters, []
            for d in waiters:
                d.callback(None)

    @inlineCallbacks
    def pending(self, group, types=EVENT_TYPES):
        total = 0
        for t in types:
            try:
                summary = yield self.execute("XPENDING", stream_key(t), group)
            except txredisapi.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    continue
                raise
            total += int(summary[0])
        return total

    def remember(self, key: str, value: str, ttl: float) -> Deferred:
        # NX: a concurrent second writer keeps the first value; PX: the ttl in milliseconds
        reply = self.execute("SET", _mark_key(key), value, "NX", "PX", str(max(int(ttl * 1000), 1)))
        return reply.addCallback(lambda stored: stored is not None)

    def recall(self, key: str) -> Deferred:
        return self.execute("GET", _mark_key(key))

    def health(self) -> dict[str, Any]:
        try:
            self.connection()
            connected = True
        except BusUnavailable:
            connected = False
        live = self._live
        return {
            "kind": self.kind,
            "url": self.settings.redacted_url(),
            "ok": connected,
            "state": "connected" if connected else "unreachable",
            "live": None if live is None else any(p.connected for p in live.pool),
        }


class RedisConsumer(Consumer):
    """Reads with XREADGROUP on a connection of its own (the BLOCK must not hold up others)."""

    block_ms = 2000

    def __init__(self, bus: RedisBus, *args: Any, **kwargs: Any):
        super().__init__(bus, *args, **kwargs)
        self.bus: RedisBus = bus
        self._reader: Optional[txredisapi.RedisFactory] = None
        self._acks: dict[str, list[tuple[str, Deferred]]] = {}
        self._ack_call: Any = None

    def startService(self) -> None:
        # a blocking read never times out client-side
        self._reader = self.bus.connect()
        super().startService()

    @inlineCallbacks
    def _prepare(self):
        while self.running:
            try:
                for stream in self.streams:
                    try:
                        # from 0: events stored before the group existed are work too
                        yield self._reader.handler.execute_command(
                            "XGROUP", "CREATE", stream, self.group, "0", "MKSTREAM")
                    except txredisapi.ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
                return
            except txredisapi.ConnectionError as exc:
                if not self.running:
                    return
                log.warn("consumer {name}: Redis not reachable ({error}); retrying",
                         name=self.consumer_name, error=exc)
                yield task.deferLater(self.bus.clock, 1.0, lambda: None)

    @inlineCallbacks
    def _read(self, count):
        try:
            reply = yield self._reader.handler.execute_command(
                "XREADGROUP", "GROUP", self.group, self.consumer_name, "COUNT", str(count),
                "BLOCK", str(self.block_ms), "STREAMS", *self.streams, *([">"] * len(self.streams)),
                apply_timeout=False)
        except txredisapi.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data (a restart without persistence)
                raise txredisapi.ConnectionError(str(exc))
            raise
        entries = []
        for stream, items in reply or []:
            for entry_id, flat in items:
                entries.append((stream, entry_id, _fields(flat).get("event")))
        return entries

    def _stop_reading(self) -> Deferred:
        self._flush_acks()
        reader, self._reader = self._reader, None
        return reader.disconnect() if reader is not None else defer.succeed(None)

    def _ack(self, stream, entry_id):
        # acks of one reactor turn share one XACK per stream
        d = Deferred()
        self._acks.setdefault(stream, []).append((entry_id, d))
        if self._ack_call is None:
            self._ack_call = self.bus.reactor.callLater(0, self._flush_acks)
        return d

    def _flush_acks(self) -> None:
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        acks, self._acks = self._acks, {}
        for stream, items in acks.items():
            result = self.bus.execute("XACK", stream, self.group, *[entry_id for entry_id, _ in items])
            result.addCallbacks(self._acked, self._not_acked, callbackArgs=(items,), errbackArgs=(items,))

    @staticmethod
    def _acked(count: Any, items: list[tuple[str, Deferred]]) -> None:
        for _, d in items:
            d.callback(1)

    @staticmethod
    def _not_acked(failure: Failure, items: list[tuple[str, Deferred]]) -> None:
        for _, d in items:
            d.errback(failure)

    def _heartbeat(self, keys):
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in keys:
            by_stream.setdefault(stream, []).append(entry_id)
        # JUSTID: resets the idle time without counting a delivery
        return defer.gatherResults(
            [self.bus.execute("XCLAIM", stream, self.group, self.consumer_name, "0", *ids, "JUSTID")
             for stream, ids in by_stream.items()], consumeErrors=True)

    @inlineCallbacks
    def _claim(self, min_idle):
        claimed = []
        min_idle_ms = str(int(min_idle * 1000))
        for stream in self.streams:
            start = "0-0"
            while True:
                reply = yield self.bus.execute("XAUTOCLAIM", stream, self.group, self.consumer_name,
                                               min_idle_ms, start, "COUNT", "100")
                start, items = reply[0], reply[1]
                items = [item for item in items if item]
                if items:
                    pending = yield self.bus.execute(
                        "XPENDING", stream, self.group, items[0][0], items[-1][0], str(len(items)),
                        self.consumer_name)
                    counts = {row[0]: int(row[3]) for row in pending}
                    for entry_id, flat in items:
                        claimed.append((stream, entry_id, _fields(flat).get("event"),
                                        counts.get(entry_id, 1)))
                if start == "0-0":
                    break
        return claimed

    def _dead_letter(self, stream, entry_id, raw, deliveries, error):
        fields = self._dead_letter_fields(stream, entry_id, raw, deliveries, error)
        return self.bus.transaction(
            ("XADD", DEAD_LETTER_STREAM, "MAXLEN", "~", self.bus._maxlen, "*", *fields),
            ("XACK", stream, self.group, entry_id))


# ---------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------

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
                 claim_idle: float = 60.0, clock: Optional[IReactorTime] = None):
        super().__init__(stream_maxlen, max_deliveries, claim_idle, clock)
        self.streams: dict[str, _Stream] = {}
        self._last_id = (0, 0)
        self._waiters: list[Deferred] = []
        self._marks: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> (value, expires), oldest first

    def startService(self) -> None:
        super().startService()
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

    def publish(self, event: Event) -> Deferred:
        raw = event.to_json().decode()
        entry_id = self.add(stream_key(event.type), raw)
        self._deliver_live(event)
        return defer.succeed(entry_id)

    def consumer(self, group, handler, types=EVENT_TYPES, name=None, **options):
        return MemoryConsumer(self, group, handler, types, name, **options)

    def recent(self, event_type=None, limit=50, before=None):
        types = [event_type] if event_type else list(EVENT_TYPES)
        try:
            bound = _parse_before(before)
        except ValueError as exc:
            return defer.fail(exc)
        entries = []
        for t in types:
            taken = 0
            for entry_id, raw in reversed(self._stream(stream_key(t)).entries):
                if bound is not None and _order(entry_id, t) >= bound:
                    continue
                entries.append((entry_id, from_stored(raw)))
                taken += 1
                if taken >= limit:
                    break
        entries.sort(key=lambda item: _order(item[0], item[1].type), reverse=True)
        return defer.succeed(entries[:limit])

    def dead_letters(self, limit=50):
        entries = self._stream(DEAD_LETTER_STREAM).entries[-limit:]
        return defer.succeed([(entry_id, json.loads(raw)) for entry_id, raw in reversed(entries)])

    def pending(self, group, types=EVENT_TYPES):
        return defer.succeed(sum(len(self._stream(stream_key(t)).groups[group].pending)
                                 for t in types if group in self._stream(stream_key(t)).groups))

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "ok": True, "state": "embedded", "live": True}

    def remember(self, key: str, value: str, ttl: float) -> Deferred:
        _mark_key(key)
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

    def recall(self, key: str) -> Deferred:
        held = self._marks.get(_mark_key(key))
        if held is None:
            return defer.succeed(None)
        if held[1] <= self.clock.seconds():
            del self._marks[key]
            return defer.succeed(None)
        return defer.succeed(held[0])

    def wait_for_entries(self) -> Deferred:
        d = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        return d


class MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, *args: Any, **kwargs: Any):
        super().__init__(bus, *args, **kwargs)
        self.bus: MemoryBus = bus
        self._waiting: Optional[Deferred] = None

    def _groups(self) -> list[tuple[str, _Stream, _Group]]:
        return [(key, self.bus._stream(key), self.bus._stream(key).groups.setdefault(self.group, _Group()))
                for key in self.streams]

    def _prepare(self):
        self._groups()
        return defer.succeed(None)

    @inlineCallbacks
    def _read(self, count):
        while True:
            entries = []
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

    def _stop_reading(self):
        if self._waiting is not None:
            self._waiting.cancel()
        return defer.succeed(None)

    def _ack(self, stream, entry_id):
        group = self.bus._stream(stream).groups.get(self.group)
        if group is not None:
            group.pending.pop(entry_id, None)
        return defer.succeed(1)

    def _heartbeat(self, keys):
        now = self.bus.clock.seconds()
        for stream, entry_id in keys:
            pending = self.bus._stream(stream).groups[self.group].pending.get(entry_id)
            if pending is not None and pending.consumer == self.consumer_name:
                pending.since = now
        return defer.succeed(None)

    def _claim(self, min_idle):
        now = self.bus.clock.seconds()
        claimed = []
        for key, stream, group in self._groups():
            for entry_id, pending in list(group.pending.items()):
                if now - pending.since < min_idle:
                    continue
                pending.consumer, pending.since = self.consumer_name, now
                pending.deliveries += 1
                claimed.append((key, entry_id, stream.index.get(entry_id), pending.deliveries))
        return defer.succeed(claimed)

    def _dead_letter(self, stream, entry_id, raw, deliveries, error):
        fields = self._dead_letter_fields(stream, entry_id, raw, deliveries, error)
        self.bus.add(DEAD_LETTER_STREAM, json.dumps(dict(zip(fields[::2], fields[1::2]))))
        return self._ack(stream, entry_id)


def make_bus(settings: Optional[RedisSection], clock: Optional[IReactorTime] = None) -> Bus:
    """The bus a config asks for: Redis when ``[redis]`` is set, else the embedded one."""
    if settings is None:
        return MemoryBus(clock=clock)
    return RedisBus(settings, clock=clock)
