"""The bus on Redis (txredisapi 1.6), docs/design.md §4.

- ``PUBLISH ckpt.<type> <json>`` for live watchers, and
- ``XADD ckpt.<type> MAXLEN ~ N * event <json>`` for the durable log,
  both in one MULTI/EXEC;
- consumer groups (``ays``) read with XREADGROUP, reclaim with XAUTOCLAIM, and
  move an entry delivered too often to the stream ``ckpt.dead``;
- every consumer beats: ``SET ckpt.consumer.<group>.<consumer> PX <consumer_timeout>``. The
  entries of a consumer whose key has lapsed are claimed by another consumer of its group, which
  then removes it from the group (``XGROUP DELCONSUMER``), both in one script.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Generator, Optional, Sequence, Union

import txredisapi
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.backends.redis.txredis import connections, reply_queue
from cockpit.backends.resp import EXEC, MULTI, CommandProtocol, Handshake, encode_command, fields
from cockpit.bus import (DEAD_LETTER_STREAM, Bus, BusUnavailable, ClaimedEntry, Consumer, Delivery, ReadEntry,
                         mark_key, entry_order, parse_before, stream_key)
from cockpit.config import RedisSection
from cockpit.events import EVENT_TYPES, Event, from_stored

log = Logger()

CONSUMER_PREFIX = "ckpt.consumer."
OWN_PAGE = 100  # entries of its own a consumer looks at per round trip when it takes them back


def heartbeat_key(group: str, consumer: str) -> str:
    """The key a consumer keeps alive while it lives: ``ckpt.consumer.<group>.<consumer>``."""
    return f"{CONSUMER_PREFIX}{group}.{consumer}"


# Beat; then, when asked to judge, claim the entries of the group's consumers whose heartbeat
# has lapsed and delete each one once it holds none: the check, the claim and the delete are
# one step, so no entry is dropped with a consumer (DELCONSUMER forgets what it held).
# KEYS: the streams. ARGV: group, this consumer, heartbeat key prefix, ttl ms, judge (1/0), limit.
# Returns {stream, id, deliveries, fields} per entry claimed.
_BEAT = """
local group, me, prefix = ARGV[1], ARGV[2], ARGV[3]
redis.call('SET', prefix .. me, '1', 'PX', ARGV[4])
if ARGV[5] ~= '1' then return {} end
local limit = tonumber(ARGV[6])
local taken = {}
for _, stream in ipairs(KEYS) do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, group)
  if ok then
    for _, info in ipairs(consumers) do
      local name, pending
      for i = 1, #info, 2 do
        if info[i] == 'name' then name = info[i + 1] elseif info[i] == 'pending' then pending = info[i + 1] end
      end
      if name ~= me and redis.call('EXISTS', prefix .. name) == 0 then
        if pending > 0 and #taken < limit then
          local ids, counts = {}, {}
          for _, row in ipairs(redis.call('XPENDING', stream, group, '-', '+', limit - #taken, name)) do
            ids[#ids + 1] = row[1]
            counts[row[1]] = row[4]
          end
          local claimed = {}
          for _, entry in ipairs(redis.call('XCLAIM', stream, group, me, 0, unpack(ids))) do
            if entry then
              claimed[entry[1]] = true
              taken[#taken + 1] = {stream, entry[1], counts[entry[1]] + 1, entry[2]}
            end
          end
          for _, id in ipairs(ids) do
            -- trimmed from the stream: nothing left to hand out
            if not claimed[id] then redis.call('XACK', stream, group, id) end
          end
          pending = #redis.call('XPENDING', stream, group, '-', '+', 1, name)
        end
        if pending == 0 then redis.call('XGROUP', 'DELCONSUMER', stream, group, name) end
      end
    end
  end
end
return taken
"""

# End this consumer's heartbeat and leave the group on each stream where it holds nothing.
# KEYS: the streams. ARGV: group, this consumer, its heartbeat key. Returns the streams it stays on.
_LEAVE = """
redis.call('DEL', ARGV[3])
local stays = 0
for _, stream in ipairs(KEYS) do
  local ok, rows = pcall(redis.call, 'XPENDING', stream, ARGV[1], '-', '+', 1, ARGV[2])
  if ok then
    if #rows == 0 then redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], ARGV[2]) else stays = stays + 1 end
  end
end
return stays
"""


class _LiveProtocol(Handshake, txredisapi.SubscriberProtocol):  # type: ignore[misc]  # txredisapi is unannotated
    def connectionMade(self) -> Deferred[None]:
        d = super().connectionMade()
        # subscriptions do not survive a reconnect: make them on every connection
        self.whenConnected().addCallback(
            lambda proto: proto.subscribe([stream_key(t) for t in EVENT_TYPES])
        ).addCallback(lambda _: self.factory.bus._live_ready(True))
        return d

    def connectionLost(self, why: Failure) -> Any:
        self.factory.bus._live_ready(False)
        return super().connectionLost(why)

    def messageReceived(self, pattern: Optional[str], channel: str, message: Union[str, bytes]) -> None:
        try:
            event = from_stored(message)
        except ValueError:
            log.warn("ignored an undecodable message on {channel}", channel=channel)
            return
        self.factory.bus._deliver_live(event)


class _BusCommandProtocol(CommandProtocol):
    """The bus's command connection, telling the bus when it is ready and when it is gone."""

    def connectionMade(self) -> Deferred[None]:
        d = super().connectionMade()
        self.whenConnected().addCallback(lambda _: self.factory.bus._command_link(True))
        return d

    def connectionLost(self, why: Failure) -> Any:
        if self._ready:
            self.factory.bus._command_link(False)
        return super().connectionLost(why)


class RedisBus(Bus):
    kind = "redis"
    remote = True

    def __init__(self, settings: RedisSection, *, reactor: Any, clock: Optional[IReactorTime] = None):
        """``reactor`` makes the connections; ``clock`` (the reactor unless given) times batches and claims."""
        super().__init__(settings.stream_maxlen, settings.max_deliveries, settings.claim_idle,
                         clock=clock if clock is not None else reactor)
        self.consumer_timeout: float = settings.consumer_timeout
        self.reactor = reactor
        self.settings = settings
        self._conn = settings.connection()
        self._maxlen = str(settings.stream_maxlen)
        self._factory: Optional[txredisapi.RedisFactory] = None
        self._live: Optional[txredisapi.SubscriberFactory] = None
        self._batch: list[tuple[str, bytes, Deferred[str]]] = []
        self._flush_call: Optional[IDelayedCall] = None
        self._encoded: dict[str, tuple[bytes, bytes]] = {}
        self._awaiting = 0  # replies owed on the command connection
        self._progress = 0.0  # when a reply last came (or the first owed one was asked for)
        self._watchdog: Optional[task.LoopingCall] = None
        self._live_subscribed = False
        self._live_waiters: list[Deferred[None]] = []
        self._lost = False  # the command connection went away and is not back yet

    def __repr__(self) -> str:
        return f"<RedisBus {self.settings.redacted_url()}>"

    # -- connections ------------------------------------------------------
    def _endpoint(self) -> IStreamClientEndpoint:
        c = self._conn
        if c["path"]:
            # Twisted's own, unannotated
            return UNIXClientEndpoint(self.reactor, c["path"],  # type: ignore[no-untyped-call]
                                      timeout=self.settings.timeout)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, c["host"], c["port"],
                                                           timeout=self.settings.timeout)
        if c["tls"]:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(c["host"]), endpoint)
        return endpoint

    def connect(self, protocol: type = CommandProtocol) -> txredisapi.RedisFactory:
        """A new lazily connecting, self-reconnecting single connection to this bus's Redis.

        It sets no reply timer per command: the bus's watchdog times the command connection,
        and a blocking read waits as long as it asked to.
        """
        c = self._conn
        # no SELECT for database 0, where a connection starts anyway
        factory = txredisapi.RedisFactory(
            self.settings.redacted_url(), c["db"] or None, 1, isLazy=True,
            password=c["password"], username=c["username"], convertNumbers=False)
        factory.protocol = protocol
        factory.bus = self
        factory.redacted_url = self.settings.redacted_url()
        self._tune(factory)
        factory.startConnecting(self._endpoint())
        return factory

    @staticmethod
    def _tune(factory: txredisapi.RedisFactory) -> None:
        # come back quickly after a Redis restart; ingress refuses meanwhile
        factory.initialDelay = 0.2
        factory.maxDelay = 2.0
        # fails when Redis refuses the handshake, which says why in the log; the connection
        # reports its state through health
        factory.deferred.addErrback(lambda f: None)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        # replies are timed by this one watchdog, not a timer per command
        self._factory = self.connect(_BusCommandProtocol)
        self._watchdog = task.LoopingCall(self._watch)
        self._watchdog.clock = self.reactor
        self._watchdog.start(max(self.settings.timeout / 4, 0.05), now=False)
        if self._subscriptions:
            self._live_wanted()
        log.info("bus: Redis at {url}", url=self.settings.redacted_url())

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        factories = [f for f in (self._factory, self._live) if f is not None]
        self._factory = self._live = None
        self._fail_batch(BusUnavailable("the bus is stopping"))
        yield defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True)

    def _command_link(self, up: bool) -> None:
        """One line when Redis goes away and one when it is back, whatever the reconnects between."""
        if up and self._lost:
            self._lost = False
            log.info("bus: Redis at {url} is reachable again", url=self.settings.redacted_url())
        elif not up and not self._lost and self.running:
            self._lost = True
            self.outages += 1
            log.warn("bus: lost the connection to Redis at {url}; events are refused until it is back",
                     url=self.settings.redacted_url())

    def _live_wanted(self) -> None:
        if self._live is None and self.running:
            c = self._conn
            factory = txredisapi.SubscriberFactory(isLazy=True)
            factory.protocol = _LiveProtocol
            factory.password, factory.username = c["password"], c["username"]
            factory.convertNumbers = False
            factory.bus = self
            factory.redacted_url = self.settings.redacted_url()
            self._tune(factory)
            factory.startConnecting(self._endpoint())
            self._live = factory

    def reachable(self) -> bool:
        try:
            self.connection()
        except BusUnavailable:
            return False
        return True

    def connection(self) -> Any:
        """The connected protocol commands go to; raises BusUnavailable when there is none."""
        for proto in connections(self._factory):
            if proto.connected:
                return proto
        raise BusUnavailable(f"Redis at {self.settings.redacted_url()} is not reachable")

    def execute(self, *args: Any) -> Deferred[Any]:
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

    def _expect(self, proto: Any, replies: int) -> Deferred[Any]:
        """Wait for ``replies`` replies on ``proto``; fires with the last one (errors as values)."""
        queue: DeferredQueue[Any] = reply_queue(proto)
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

    def transaction(self, *commands: Sequence[Any]) -> Deferred[list[Any]]:
        """Run ``commands`` in one MULTI/EXEC; fires with EXEC's list of replies."""
        try:
            proto = self.connection()
        except BusUnavailable as exc:
            return defer.fail(exc)
        reply = self._expect(proto, len(commands) + 2)
        proto.transport.write(b"".join([MULTI, *map(encode_command, commands), EXEC]))
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
            for proto in connections(self._factory):
                proto.transport.abortConnection()

    # -- publishing ---------------------------------------------------------
    def publish(self, event: Event) -> Deferred[str]:
        try:
            self.connection()
        except BusUnavailable as exc:
            return defer.fail(exc)
        d: Deferred[str] = Deferred()
        d.addCallback(self._stored, event)
        self._batch.append((stream_key(event.type), self.stamp(event).to_json(), d))
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
        parts = [MULTI]
        for key, raw, _ in batch:
            xadd, publish = self._prefixes(key)
            size = b"$%d\r\n" % len(raw)
            parts += (xadd, size, raw, b"\r\n", publish, size, raw, b"\r\n")
        parts.append(EXEC)
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

    def _committed(self, replies: Any, batch: list[tuple[str, bytes, Deferred[str]]]) -> None:
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

    def _not_committed(self, failure: Failure, batch: list[tuple[str, bytes, Deferred[str]]]) -> None:
        if failure.check(txredisapi.ConnectionError):
            exc = BusUnavailable(f"Redis at {self.settings.redacted_url()} did not answer: "
                                 f"{failure.getErrorMessage()}")
        else:
            exc = BusUnavailable(f"Redis refused the events: {failure.getErrorMessage()}")
        for _, _, d in batch:
            d.errback(exc)

    # -- reading ------------------------------------------------------------------
    # the handler gets events, or what a ``decode`` among the options makes of the entries (the outbox's mail)
    def consumer(self, group: str, handler: Callable[[Any, Delivery], Any], types: Sequence[str] = EVENT_TYPES,
                 name: Optional[str] = None, **options: Any) -> RedisConsumer:
        return RedisConsumer(self, group, handler, types, name, **options)

    @inlineCallbacks
    def recent(self, event_type: Optional[str] = None, limit: int = 50,
               before: Optional[str] = None) -> Generator[Deferred[Any], Any, list[tuple[str, Event]]]:
        types = [event_type] if event_type else list(EVENT_TYPES)
        bound = parse_before(before)
        commands = []
        for t in types:
            high = "+"
            if bound is not None:
                entry_id = f"{bound[0]}-{bound[1]}"
                # ties on the id are ordered by type: earlier types still include the id itself
                high = entry_id if entry_order(entry_id, t) < bound else f"({entry_id}"
                if high == "(0-0":
                    continue  # nothing is below the first possible id (and Redis refuses the range)
            commands.append(self.execute("XREVRANGE", stream_key(t), high, "-", "COUNT", str(limit)))
        replies = yield defer.gatherResults(commands, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)
        entries: list[tuple[str, Event]] = []
        for reply in replies:
            for entry_id, flat in reply or []:
                raw = fields(flat).get("event")
                if raw is None:
                    continue
                try:
                    entries.append((entry_id, from_stored(raw)))
                except ValueError:
                    log.warn("skipped an undecodable entry {id}", id=entry_id)
        entries.sort(key=lambda item: entry_order(item[0], item[1].type), reverse=True)
        return entries[:limit]

    @inlineCallbacks
    def dead_letters(self, limit: int = 50) -> Generator[Deferred[Any], Any, list[tuple[str, dict[str, str]]]]:
        reply = yield self.execute("XREVRANGE", DEAD_LETTER_STREAM, "+", "-", "COUNT", str(limit))
        return [(entry_id, fields(flat)) for entry_id, flat in reply or []]

    def when_connected(self) -> Deferred[None]:
        """Fires once commands can be sent."""
        # the pool hands a connection to waiters a moment before it lists it as its own
        assert self._factory is not None, "the bus is not started"
        connected: Deferred[None] = self._factory.getConnection(peek=True).addCallback(
            lambda _: task.deferLater(self.reactor, 0, lambda: None))
        return connected

    def when_disconnected(self) -> Deferred[None]:
        """Fires once the command connection is gone (now, if there is none)."""
        try:
            gone: Deferred[None] = self.connection().whenDisconnected().addCallback(lambda _: None)
            return gone
        except BusUnavailable:
            return defer.succeed(None)

    def when_live(self) -> Deferred[None]:
        """Fires once live subscriptions are in place on the current connection."""
        if self._live_subscribed:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._live_waiters.append(d)
        return d

    def _live_ready(self, subscribed: bool) -> None:
        self._live_subscribed = subscribed
        if subscribed:
            waiters, self._live_waiters = self._live_waiters, []
            for d in waiters:
                d.callback(None)

    @inlineCallbacks
    def pending(self, group: str, types: Sequence[str] = EVENT_TYPES) -> Generator[Deferred[Any], Any, int]:
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

    def remember(self, key: str, value: str, ttl: float) -> Deferred[bool]:
        # NX: a concurrent second writer keeps the first value; PX: the ttl in milliseconds
        reply = self.execute("SET", mark_key(key), value, "NX", "PX", str(max(int(ttl * 1000), 1)))
        return reply.addCallback(lambda stored: stored is not None)

    def recall(self, key: str) -> Deferred[Optional[str]]:
        return self.execute("GET", mark_key(key))

    def forget(self, key: str) -> Deferred[bool]:
        return self.execute("DEL", mark_key(key)).addCallback(lambda removed: removed == 1)

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
            "live": None if live is None else any(p.connected for p in connections(live)),
        }


class RedisConsumer(Consumer):
    """Reads with XREADGROUP on a connection of its own (the BLOCK must not hold up others)."""

    block_ms = 2000
    unblock_tries = 20  # CLIENT UNBLOCKs a stop sends, 50 ms apart, before it waits for the BLOCK to end

    def __init__(self, bus: RedisBus, *args: Any, **kwargs: Any):
        super().__init__(bus, *args, **kwargs)
        self.bus: RedisBus = bus
        self.heartbeat_key = heartbeat_key(self.group, self.consumer_name)
        self._heartbeat_prefix = heartbeat_key(self.group, "")  # the script adds each consumer's name
        self._reader: Optional[txredisapi.RedisFactory] = None
        self._reader_id: Optional[str] = None
        self._reading = False
        self._acks: dict[str, list[tuple[str, Deferred[int]]]] = {}
        self._ack_call: Any = None

    def startService(self) -> None:
        # a blocking read never times out client-side
        self._reader = self.bus.connect()
        super().startService()

    def _reader_command(self, *args: str, **kwargs: Any) -> Deferred[Any]:
        """A command on the reader's connection; a stop may already have closed it while we waited."""
        if self._reader is None:
            return defer.fail(txredisapi.ConnectionError("the consumer is stopping"))
        reply: Deferred[Any] = self._reader.handler.execute_command(*args, **kwargs)
        return reply

    @inlineCallbacks
    def _prepare(self) -> Generator[Deferred[Any], Any, None]:
        while self.running:
            try:
                for stream in self.streams:
                    try:
                        # from 0: events stored before the group existed are work too
                        yield self._reader_command("XGROUP", "CREATE", stream, self.group, "0", "MKSTREAM")
                    except txredisapi.ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):
                            raise
                # a stop cuts the blocking read short with CLIENT UNBLOCK, which names the connection
                self._reader_id = str((yield self._reader_command("CLIENT", "ID")))
                return
            except txredisapi.ConnectionError as exc:
                if not self.running:
                    return
                # unless the bus says it lost Redis
                self.bus.unless_lost(partial(log.warn, "consumer {name}: Redis not reachable ({error}); retrying",
                                             name=self.consumer_name, error=exc))
                yield self._pause(1.0)

    @inlineCallbacks
    def _read(self, count: int) -> Generator[Deferred[Any], Any, list[ReadEntry]]:
        self._reading = True
        try:
            reply = yield self._reader_command(
                "XREADGROUP", "GROUP", self.group, self.consumer_name, "COUNT", str(count),
                "BLOCK", str(self.block_ms), "STREAMS", *self.streams, *([">"] * len(self.streams)),
                apply_timeout=False)
        except txredisapi.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data (a restart without persistence)
                raise txredisapi.ConnectionError(str(exc))
            raise
        finally:
            self._reading = False
        entries: list[ReadEntry] = []
        for stream, items in reply or []:
            for entry_id, flat in items:
                entries.append((stream, entry_id, fields(flat).get("event")))
        return entries

    @inlineCallbacks
    def _interrupt_read(self) -> Generator[Deferred[Any], Any, None]:
        if self._reader is None or self._reader_id is None:
            yield self._stop_reading()  # not reading yet: nothing handed out can be lost
            return
        # like a BLOCK that timed out: the read comes back empty, unless entries are on their way
        for _ in range(self.unblock_tries):
            if not self._reading or int((yield self.bus.execute("CLIENT", "UNBLOCK", self._reader_id))):
                return
            # not blocked: its reply is on the way, or Redis has yet to see the read (it came on
            # the other connection after this UNBLOCK)
            yield task.deferLater(self.bus.reactor, 0.05, lambda: None)  # the network's time, as the watchdog's

    def _stop_reading(self) -> Deferred[None]:
        self._flush_acks()
        reader, self._reader = self._reader, None
        return reader.disconnect() if reader is not None else defer.succeed(None)

    def _beat(self, judge: int, limit: int) -> Deferred[list[ClaimedEntry]]:
        d = self.bus.execute("EVAL", _BEAT, str(len(self.streams)), *self.streams, self.group, self.consumer_name,
                             self._heartbeat_prefix, str(int(self.bus.consumer_timeout * 1000)),
                             "1" if judge else "0", str(limit))
        return d.addCallback(lambda rows: [(stream, entry_id, fields(flat).get("event"), int(deliveries))
                                           for stream, entry_id, deliveries, flat in rows or []])

    def _leave(self) -> Deferred[int]:
        return self.bus.execute("EVAL", _LEAVE, str(len(self.streams)), *self.streams, self.group,
                                self.consumer_name, self.heartbeat_key).addCallback(int)

    def _ack(self, stream: str, entry_id: str) -> Deferred[int]:
        # acks of one reactor turn share one XACK per stream
        d: Deferred[int] = Deferred()
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
    def _acked(count: Any, items: list[tuple[str, Deferred[int]]]) -> None:
        for _, d in items:
            d.callback(1)

    @staticmethod
    def _not_acked(failure: Failure, items: list[tuple[str, Deferred[int]]]) -> None:
        for _, d in items:
            d.errback(failure)

    def _touch(self, keys: list[tuple[str, str]]) -> Deferred[list[Any]]:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in keys:
            by_stream.setdefault(stream, []).append(entry_id)
        # JUSTID: resets the idle time without counting a delivery
        return defer.gatherResults(
            [self.bus.execute("XCLAIM", stream, self.group, self.consumer_name, "0", *ids, "JUSTID")
             for stream, ids in by_stream.items()], consumeErrors=True)

    @inlineCallbacks
    def _claim(self, min_idle: float) -> Generator[Deferred[Any], Any, list[ClaimedEntry]]:
        claimed: list[ClaimedEntry] = []
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
                        claimed.append((stream, entry_id, fields(flat).get("event"),
                                        counts.get(entry_id, 1)))
                if start == "0-0":
                    break
        return claimed

    @inlineCallbacks
    def _claim_own(self, held: set[tuple[str, str]]) -> Generator[Deferred[Any], Any, list[ClaimedEntry]]:
        claimed: list[ClaimedEntry] = []
        for stream in self.streams:
            start = "-"
            while True:
                try:
                    rows = yield self.bus.execute("XPENDING", stream, self.group, start, "+", str(OWN_PAGE),
                                                  self.consumer_name)
                except txredisapi.ResponseError as exc:
                    if "NOGROUP" in str(exc):  # Redis lost its data: nothing is pending
                        break
                    raise
                counts = {row[0]: int(row[3]) for row in rows if (stream, row[0]) not in held}
                if counts:
                    # min-idle 0: this consumer's own entries, whatever their idle time; a delivery is counted
                    entries = yield self.bus.execute("XCLAIM", stream, self.group, self.consumer_name, "0",
                                                     *counts)
                    found = set()
                    for entry in entries or []:
                        if entry:
                            entry_id, flat = entry
                            found.add(entry_id)
                            claimed.append((stream, entry_id, fields(flat).get("event"), counts[entry_id] + 1))
                    gone = [entry_id for entry_id in counts if entry_id not in found]
                    if gone:  # trimmed from the stream: nothing left to hand out
                        yield self.bus.execute("XACK", stream, self.group, *gone)
                if len(rows) < OWN_PAGE:
                    break
                start = "(" + rows[-1][0]
        return claimed

    def _dead_letter(self, stream: str, entry_id: str, raw: str, deliveries: int, error: str) -> Deferred[list[Any]]:
        fields = self._dead_letter_fields(stream, entry_id, raw, deliveries, error)
        return self.bus.transaction(
            ("XADD", DEAD_LETTER_STREAM, "MAXLEN", "~", self.bus._maxlen, "*", *fields),
            ("XACK", stream, self.group, entry_id))
