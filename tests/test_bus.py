"""One behaviour suite for both buses, plus what only Redis can show."""
from __future__ import annotations

import json
import signal

import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit.backends.embedded import MemoryBus
from cockpit.backends.redis import RedisBus
from cockpit.bus import AYS_GROUP, BEATS_PER_TIMEOUT, BusUnavailable, cursor, stream_key
from cockpit.config import RedisSection
from cockpit.events import AlarmEvent, EmailEvent, GenericEvent
from cockpit.metrics import Metrics
from tests.redis_server import RedisServer, bus_on_shared_server, shared_server
from tests.wiring import started


def alarm(n: int = 0) -> AlarmEvent:
    return AlarmEvent(service=f"node!n{n}", method="monitor", msg=f"disk {n}")


class Recorder:
    """A consumer handler that records events and can be told to fail or hold."""

    def __init__(self, fail: bool = False, hold: bool = False):
        self.fail = fail
        self.hold = hold
        self.seen: list[tuple[str, int]] = []
        self.held: list[Deferred] = []
        self.peak = 0  # the most entries it had in hand at once
        self._waiting: list[tuple[int, Deferred]] = []

    def __call__(self, event, delivery):
        self.seen.append((event.guid, delivery.deliveries))
        self.peak = max(self.peak, 1 + sum(1 for d in self.held if not d.called))
        for want, d in list(self._waiting):
            if len(self.seen) >= want:
                self._waiting.remove((want, d))
                # after this handler has returned and its outcome is booked
                reactor.callLater(0, d.callback, self.seen)
        if self.hold:
            d = Deferred()
            self.held.append(d)
            return d
        if self.fail:
            raise RuntimeError("handler refuses this event")
        return None

    def wait(self, count: int) -> Deferred:
        if len(self.seen) >= count:
            return defer.succeed(self.seen)
        d = Deferred()
        self._waiting.append((count, d))
        return d


class BusBehaviour:
    """What every bus must do; subclasses say how to make one."""

    def make_bus(self):
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.bus = yield started(self, self.make_bus())

    def start_consumer(self, handler, **options):
        # claim whatever is pending when a test calls reclaim()
        self.bus.claim_idle = 0
        options.setdefault("drain_timeout", 0)
        consumer = self.bus.consumer(AYS_GROUP, handler, **options)
        consumer.startService()
        self.addCleanup(consumer.stopService)
        return consumer

    @inlineCallbacks
    def test_published_event_is_in_the_log_newest_first(self):
        first, second, mail = alarm(1), alarm(2), EmailEvent(subject="hi")
        id1 = yield self.bus.publish(first)
        id2 = yield self.bus.publish(second)
        id3 = yield self.bus.publish(mail)
        recent = yield self.bus.recent()
        self.assertEqual({mail.guid, second.guid, first.guid}, {ev.guid for _, ev in recent})
        self.assertLess(recent.index((id2, second)), recent.index((id1, first)))
        only_alarms = yield self.bus.recent("alarm")
        self.assertEqual([(id2, second.guid), (id1, first.guid)],
                         [(entry_id, ev.guid) for entry_id, ev in only_alarms])
        only_mail = yield self.bus.recent("email")
        self.assertEqual([(id3, mail.guid)], [(entry_id, ev.guid) for entry_id, ev in only_mail])
        # paging: everything below a position, whichever stream it is in
        older = yield self.bus.recent(before=cursor(id2, "alarm"))
        self.assertIn(first.guid, [ev.guid for _, ev in older])
        self.assertNotIn(second.guid, [ev.guid for _, ev in older])
        limited = yield self.bus.recent(limit=1)
        self.assertEqual(1, len(limited))
        self.assertEqual([], (yield self.bus.recent(before="0-0")))
        self.assertEqual([], (yield self.bus.recent("alarm", before="0-0/email")))

    @inlineCallbacks
    def test_every_stored_event_is_counted_by_type_and_source_whoever_published_it(self):
        self.bus.metrics = metrics = Metrics(process=False)
        yield self.bus.publish(AlarmEvent(service="node!n1", source="heartbeats"))
        yield self.bus.publish(GenericEvent(source="ext:poller"))
        text = metrics.render()
        self.assertIn(b'cockpit_events_published_total{source="heartbeats",type="alarm"} 1.0', text)
        self.assertIn(b'cockpit_events_published_total{source="ext:poller",type="generic"} 1.0', text)

    @inlineCallbacks
    def test_live_subscriber_gets_events_of_its_types(self):
        got = []
        arrived = Deferred()

        def on_event(event):
            got.append(event)
            if event.type == "email":
                arrived.callback(None)

        self.bus.subscribe(on_event, types=["email"])
        yield self.live_ready()
        yield self.bus.publish(alarm())
        mail = EmailEvent(subject="watch me")
        yield self.bus.publish(mail)
        yield arrived
        self.assertEqual([mail.guid], [e.guid for e in got])
        self.assertEqual("watch me", got[0].subject)

    def live_ready(self):
        return defer.succeed(None)

    @inlineCallbacks
    def test_before_dispatch_runs_after_each_read_and_before_its_entries_are_handled(self):
        recorder = Recorder()
        calls = []
        failures = [RuntimeError("the view cannot be brought up to date yet")]
        first_call: Deferred = Deferred()

        def catch_up():
            calls.append(len(recorder.seen))  # how many entries the handler had seen by then
            if not first_call.called:
                reactor.callLater(0, first_call.callback, None)
            if failures:
                return defer.fail(failures.pop())
            return defer.succeed(None)

        yield self.bus.publish(alarm(1))
        self.bus.clock = clock = Clock()  # the retry's wait
        self.start_consumer(recorder, before_dispatch=catch_up)
        yield first_call
        self.assertEqual([], recorder.seen)  # it failed: nothing is handled
        clock.advance(1.0)
        yield recorder.wait(1)
        self.assertEqual([0, 0], calls[:2])  # tried again, and only then the entry went to the handler

    @inlineCallbacks
    def test_consumer_gets_each_event_and_acks_after_handler(self):
        events = [alarm(i) for i in range(5)]
        for event in events:
            yield self.bus.publish(event)
        recorder = Recorder(hold=True)
        self.start_consumer(recorder)
        yield recorder.wait(5)
        self.assertEqual(sorted(e.guid for e in events), sorted(g for g, _ in recorder.seen))
        pending = yield self.bus.pending(AYS_GROUP)
        self.assertEqual(5, pending)
        for d in recorder.held:
            d.callback(None)
        yield self.settle()
        pending = yield self.bus.pending(AYS_GROUP)
        self.assertEqual(0, pending)

    @inlineCallbacks
    def test_when_handled_fires_once_that_many_entries_are_acknowledged(self):
        recorder = Recorder(hold=True)
        consumer = self.start_consumer(recorder)
        self.assertEqual(0, (yield consumer.when_handled(0)))
        one, two, cancelled = consumer.when_handled(1), consumer.when_handled(2), consumer.when_handled(3)
        cancelled.cancel()
        self.failureResultOf(cancelled, defer.CancelledError)
        for i in range(2):
            yield self.bus.publish(alarm(i))
        yield recorder.wait(2)
        self.assertFalse(one.called)
        recorder.held[0].callback(None)
        self.assertEqual(1, (yield one))
        self.assertFalse(two.called)
        self.assertEqual(1, (yield self.bus.pending(AYS_GROUP)))
        recorder.held[1].callback(None)
        self.assertEqual(2, (yield two))
        self.assertEqual(0, (yield self.bus.pending(AYS_GROUP)))

    def settle(self):
        # acks are written through the bus; a round trip through it has them done
        return self.bus.recent(limit=1)

    @inlineCallbacks
    def test_a_stop_under_load_acknowledges_every_entry_handed_out(self):
        for i in range(300):
            yield self.bus.publish(alarm(i))
        handed: list[str] = []

        def handler(event, delivery):
            handed.append(event.guid)
            return task.deferLater(reactor, 0, lambda: None)  # an action that takes a moment

        consumer = self.start_consumer(handler, concurrency=16, drain_timeout=10)
        yield consumer.when_handled(50)
        yield consumer.stopService()
        self.assertLess(len(handed), 300)  # it stopped in the middle of the work
        self.assertEqual(len(handed), consumer.handled)  # what it was handed, it finished and acknowledged
        self.assertEqual(0, (yield self.bus.pending(AYS_GROUP)))
        yield self.stopped_cleanly(consumer)

    def stopped_cleanly(self, consumer):
        return defer.succeed(None)

    @inlineCallbacks
    def test_failed_handler_is_redelivered_on_reclaim(self):
        yield self.bus.publish(alarm())
        recorder = Recorder(fail=True)
        consumer = self.start_consumer(recorder)
        yield recorder.wait(1)
        recorder.fail = False
        taken = yield consumer.reclaim()
        self.assertEqual(1, taken)
        yield recorder.wait(2)
        self.assertEqual([1, 2], [n for _, n in recorder.seen])
        yield self.settle()
        self.assertEqual(0, (yield self.bus.pending(AYS_GROUP)))
        self.assertEqual(1, len(self.flushLoggedErrors(RuntimeError)))

    @inlineCallbacks
    def test_poison_entry_moves_to_dead_letters_after_max_deliveries(self):
        poison = alarm(666)
        yield self.bus.publish(poison)
        recorder = Recorder(fail=True)
        consumer = self.start_consumer(recorder)
        yield recorder.wait(1)
        for _ in range(self.bus.max_deliveries):
            yield consumer.reclaim()
        yield self.settle()
        self.assertEqual(self.bus.max_deliveries, len(recorder.seen))
        dead = yield self.bus.dead_letters()
        self.assertEqual(1, len(dead))
        fields = dead[0][1]
        self.assertEqual(stream_key("alarm"), fields["stream"])
        self.assertEqual(str(self.bus.max_deliveries + 1), fields["deliveries"])
        self.assertEqual(poison.guid, json.loads(fields["event"])["guid"])
        self.assertIn("handler refuses this event", fields["error"])
        self.assertEqual(0, (yield self.bus.pending(AYS_GROUP)))
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_entries_of_a_killed_consumer_are_reclaimed_by_another(self):
        events = [alarm(i) for i in range(10)]
        for event in events:
            yield self.bus.publish(event)
        doomed = Recorder(hold=True)
        first = self.start_consumer(doomed, name="doomed", concurrency=4)
        yield doomed.wait(4)
        yield first.stopService()  # dies mid-batch: four entries delivered, none acked
        self.assertEqual(4, (yield self.bus.pending(AYS_GROUP)))
        survivor = Recorder()
        second = self.start_consumer(survivor, name="survivor")
        yield survivor.wait(6)
        yield second.reclaim()
        yield survivor.wait(10)
        self.assertEqual(sorted(e.guid for e in events), sorted(g for g, _ in survivor.seen))
        yield self.settle()
        self.assertEqual(0, (yield self.bus.pending(AYS_GROUP)))

    @inlineCallbacks
    def test_a_consumer_holding_more_than_its_concurrency_reads_only_once_it_has_room(self):
        for i in range(6):
            yield self.bus.publish(alarm(i))
        first = Recorder(hold=True)
        leaving = self.start_consumer(first, name="first", concurrency=4)
        yield first.wait(4)
        yield leaving.stopService()  # leaves its four pending
        second = Recorder(hold=True)
        consumer = self.start_consumer(second, name="second", concurrency=2)
        yield second.wait(2)
        yield consumer.reclaim()  # the four come on top of what it holds (or took over already)
        yield second.wait(4)
        held_at_most = second.peak
        for i in range(4):
            yield self.bus.publish(alarm(10 + i))
        released = 0
        while released < 10:
            yield second.wait(released + 1)
            second.held[released].callback(None)
            released += 1
            yield consumer.when_handled(released)
        self.assertLessEqual(second.peak, max(held_at_most, 2))  # no read while it held too many

    @inlineCallbacks
    def test_two_consumers_of_one_group_share_the_work(self):
        seen: list[tuple[int, str]] = []
        all_seen = Deferred()

        def handler_of(index):
            def handle(event, delivery):
                seen.append((index, event.guid))
                if len(seen) == 20:
                    all_seen.callback(None)
            return handle

        for index in range(2):
            self.start_consumer(handler_of(index), name=f"c{index}", concurrency=2)
        events = [alarm(i) for i in range(20)]
        for event in events:
            yield self.bus.publish(event)
        yield all_seen
        self.assertEqual(sorted(e.guid for e in events), sorted(g for _, g in seen))

    @inlineCallbacks
    def test_a_new_group_sees_events_published_before_it(self):
        early = GenericEvent(tags=["early"])
        yield self.bus.publish(early)
        recorder = Recorder()
        self.start_consumer(recorder)
        yield recorder.wait(1)
        self.assertEqual(early.guid, recorder.seen[0][0])


    @inlineCallbacks
    def test_a_remembered_value_is_recalled_and_the_first_one_is_kept(self):
        key = "ckpt.test.delivery.d-1"
        self.assertIsNone((yield self.bus.recall(key)))
        self.assertTrue((yield self.bus.remember(key, "first", 60)))
        self.assertFalse((yield self.bus.remember(key, "second", 60)))
        self.assertEqual("first", (yield self.bus.recall(key)))
        self.assertIsNone((yield self.bus.recall("ckpt.test.delivery.d-2")))

    def test_a_mark_outside_the_ckpt_names_is_refused(self):
        self.assertRaises(ValueError, self.bus.remember, "test.delivery.d-1", "x", 60)
        self.assertRaises(ValueError, self.bus.recall, "test.delivery.d-1")


class MemoryBusTests(BusBehaviour, TestCase):
    timeout = 10

    def make_bus(self):
        self.clock = Clock()
        return MemoryBus(max_deliveries=3, claim_idle=30, clock=self.clock)

    def test_reclaim_runs_on_its_own_clock(self):
        self.bus.publish(alarm())
        recorder = Recorder(fail=True)
        self.start_consumer(recorder)
        self.bus.claim_idle = 30
        self.assertEqual(1, len(recorder.seen))
        self.clock.advance(29)  # idle, but not long enough
        self.assertEqual(1, len(recorder.seen))
        self.clock.advance(11)
        self.assertEqual([1, 2], [n for _, n in recorder.seen])
        self.flushLoggedErrors(RuntimeError)

    def test_a_mark_is_forgotten_once_its_ttl_has_passed_on_the_bus_clock(self):
        self.assertTrue(self.successResultOf(self.bus.remember("ckpt.test.a", "guid-a", 10)))
        self.clock.advance(9.5)
        self.assertEqual("guid-a", self.successResultOf(self.bus.recall("ckpt.test.a")))
        self.clock.advance(0.5)
        self.assertIsNone(self.successResultOf(self.bus.recall("ckpt.test.a")))
        # expired: the key takes a new value
        self.assertTrue(self.successResultOf(self.bus.remember("ckpt.test.a", "guid-b", 10)))
        self.assertEqual("guid-b", self.successResultOf(self.bus.recall("ckpt.test.a")))

    def test_marks_are_bounded_in_memory_and_expired_ones_are_dropped(self):
        self.bus.max_marks = 3
        for n in range(5):
            self.bus.remember(f"ckpt.test.{n}", str(n), 10)
        self.assertEqual(["ckpt.test.2", "ckpt.test.3", "ckpt.test.4"], list(self.bus._marks))
        self.clock.advance(10)
        self.bus.remember("ckpt.test.new", "n", 10)  # a write drops what has expired before it
        self.assertEqual(["ckpt.test.new"], list(self.bus._marks))


class RedisBusTests(BusBehaviour, TestCase):
    timeout = 20

    def make_bus(self):
        self.redis, bus = bus_on_shared_server(max_deliveries=3, claim_idle=30)
        return bus

    def start_consumer(self, handler, **options):
        consumer = super().start_consumer(handler, **options)
        consumer.block_ms = 100
        return consumer

    def live_ready(self):
        return self.bus.when_live()

    @inlineCallbacks
    def stopped_cleanly(self, consumer):
        self.assertEqual({}, (yield consumers_of(self.bus, AYS_GROUP)))  # it left its group
        self.assertEqual(0, (yield self.bus.execute("EXISTS", consumer.heartbeat_key)))

    @inlineCallbacks
    def test_a_stop_cuts_a_blocked_read_short(self):
        consumer = self.start_consumer(Recorder())
        consumer.block_ms = 3_600_000  # this test would time out if the stop waited for the read
        yield self.bus.publish(alarm(1))
        yield consumer.when_handled(1)
        yield self.settle()  # the consumer is blocked in its next read by now
        yield consumer.stopService()
        self.assertEqual({}, (yield consumers_of(self.bus, AYS_GROUP)))

    @inlineCallbacks
    def test_a_stop_while_the_group_is_being_created_ends_the_consumer_quietly(self):
        consumer = self.bus.consumer(AYS_GROUP, Recorder(), drain_timeout=0)
        stopped = []
        connect = self.bus.connect

        def connect_and_stop_once_the_group_is_answered():
            reader = connect()
            command = reader.handler.execute_command

            def execute_command(*args, **kwargs):
                d = command(*args, **kwargs)
                if args[0] == "XGROUP":
                    # the stop lands between the group's reply and the next command on that connection
                    d.addCallback(lambda reply: (stopped.append(consumer.stopService()), reply)[1])
                return d

            reader.handler.execute_command = execute_command
            return reader

        self.bus.connect = connect_and_stop_once_the_group_is_answered
        consumer.startService()
        yield consumer._loop
        yield stopped[0]
        self.assertFalse(consumer.running)
        self.assertEqual({}, (yield consumers_of(self.bus, AYS_GROUP)))

    @inlineCallbacks
    def test_published_event_is_on_the_channel_and_in_the_stream(self):
        received = Deferred()

        class Watcher(txredisapi.SubscriberProtocol):
            def messageReceived(self, pattern, channel, message):
                received.callback((channel, message))

        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = Watcher
        factory.convertNumbers = False
        factory.startConnecting(TCP4ClientEndpoint(reactor, "127.0.0.1", self.redis.port))
        self.addCleanup(factory.disconnect)
        watcher = yield factory.deferred
        yield watcher.subscribe("ckpt.alarm")
        event = alarm(7)
        entry_id = yield self.bus.publish(event)
        channel, message = yield received
        self.assertEqual("ckpt.alarm", channel)
        self.assertEqual(event.guid, json.loads(message)["guid"])
        xrange = self.redis.command("XRANGE", "ckpt.alarm", "-", "+")
        self.assertIn(entry_id, xrange)
        self.assertIn(event.guid, xrange)


    def test_a_read_is_a_deferred(self):
        # the consumer's loop yields it; a bare generator would be run only by a Twisted whose
        # inlineCallbacks runs yielded generators itself, not by every release setup.py allows
        consumer = self.bus.consumer(AYS_GROUP, Recorder())
        read = consumer._read(10)
        self.assertIsInstance(read, Deferred)
        self.failureResultOf(read, txredisapi.ConnectionError)  # not started: it has no reader yet

    @inlineCallbacks
    def test_a_mark_is_a_redis_key_that_expires_after_its_ttl(self):
        self.assertTrue((yield self.bus.remember("ckpt.test.delivery.d-9", "guid-9", 60)))
        self.assertEqual('"guid-9"', self.redis.command("GET", "ckpt.test.delivery.d-9").strip())
        ttl = int(self.redis.command("PTTL", "ckpt.test.delivery.d-9").split()[-1])
        self.assertTrue(59000 < ttl <= 60000, ttl)

    @inlineCallbacks
    def test_an_event_redis_refuses_fails_alone_in_its_batch(self):
        self.redis.command("SET", "ckpt.generic", "not a stream")
        refused = self.bus.publish(GenericEvent(tags=["x"]))
        accepted = self.bus.publish(alarm(1))  # same reactor turn: same MULTI/EXEC
        failure = yield self.assertFailure(refused, BusUnavailable)
        self.assertIn("WRONGTYPE", str(failure))
        entry_id = yield accepted
        self.assertIn(entry_id, self.redis.command("XRANGE", "ckpt.alarm", "-", "+"))


def consumers_of(bus, group, types=None):
    """Fires with ``{consumer: pending}`` of ``group``, summed over the streams of ``types``."""
    @inlineCallbacks
    def collect():
        found: dict[str, int] = {}
        for t in types or ("email", "telegram", "alarm", "eco", "generic"):
            try:
                rows = yield bus.execute("XINFO", "CONSUMERS", stream_key(t), group)
            except txredisapi.ResponseError:
                continue  # no such stream or group
            for row in rows:
                info = dict(zip(row[::2], row[1::2]))
                found[info["name"]] = found.get(info["name"], 0) + int(info["pending"])
        return found
    return collect()


@inlineCallbacks
def crash(consumer):
    """What a killed process leaves of its consumer: entries pending, a heartbeat key until it lapses."""
    for timer in (consumer._beater, consumer._reclaimer):
        if timer is not None and timer.running:
            timer.stop()
    consumer.running = False
    yield consumer._stop_reading()


class RedisTakeoverTests(TestCase):
    """Heartbeats: two consumers of one group on two connections, as two processes would have them,
    each beating on a Clock of its own."""

    timeout = 20

    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()

    @inlineCallbacks
    def make_bus(self, **settings):
        clock = Clock()
        # a long claim_idle: what is taken over here is taken through heartbeats alone
        bus = RedisBus(RedisSection(url=self.redis.url, claim_idle=3600, **settings), clock=clock, reactor=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        yield bus.when_connected()
        return bus

    @inlineCallbacks
    def start(self, bus, handler, name, **options):
        consumer = bus.consumer(AYS_GROUP, handler, name=name, types=["alarm"], drain_timeout=0, **options)
        consumer.block_ms = 100
        consumer.startService()
        self.addCleanup(lambda: consumer.stopService() if consumer.running else None)
        yield consumer.when_ready()
        return consumer

    def pttl(self, key):
        return int(self.redis.command("PTTL", key).split()[-1])

    @inlineCallbacks
    def publish(self, bus, count):
        for i in range(count):
            yield bus.publish(alarm(i))

    @inlineCallbacks
    def test_a_consumer_beats_on_its_clock_and_its_heartbeat_lives_consumer_timeout(self):
        bus = yield self.make_bus(consumer_timeout=10)
        consumer = yield self.start(bus, Recorder(), "beating")
        self.assertEqual("ckpt.consumer.ays.beating", consumer.heartbeat_key)
        self.assertTrue(9000 < self.pttl(consumer.heartbeat_key) <= 10000)
        self.redis.command("PEXPIRE", consumer.heartbeat_key, "3000")
        bus.clock.advance(consumer.beat_interval)  # 2 s: a fifth of the timeout
        yield bus.execute("PING")  # after the beat's round trip
        self.assertTrue(9000 < self.pttl(consumer.heartbeat_key) <= 10000)

    @inlineCallbacks
    def test_entries_of_a_consumer_whose_heartbeat_lapsed_are_taken_at_the_next_beat_and_it_leaves_the_group(self):
        doomed_bus = yield self.make_bus()
        survivor_bus = yield self.make_bus()
        yield self.publish(doomed_bus, 6)
        doomed = yield self.start(doomed_bus, Recorder(hold=True), "doomed", concurrency=4)
        survivor_seen = Recorder()
        survivor = yield self.start(survivor_bus, survivor_seen, "survivor")
        yield survivor_seen.wait(2)
        yield crash(doomed)
        self.assertEqual({"doomed": 4, "survivor": 0}, (yield consumers_of(survivor_bus, AYS_GROUP)))
        # while its heartbeat lives, what it holds is its own
        self.assertEqual(0, (yield survivor.take_over()))
        # its heartbeat lapses (Redis expires the key consumer_timeout after the last beat)
        self.redis.command("DEL", doomed.heartbeat_key)
        survivor_bus.clock.advance(survivor.beat_interval)
        yield survivor_seen.wait(6)
        self.assertEqual([2, 2, 2, 2], [n for _, n in survivor_seen.seen[2:]])  # a second delivery each
        yield survivor_bus.execute("PING")  # the acknowledgements have been written
        self.assertEqual({"survivor": 0}, (yield consumers_of(survivor_bus, AYS_GROUP)))
        self.assertEqual(0, (yield survivor_bus.pending(AYS_GROUP)))

    @inlineCallbacks
    def test_a_dead_consumer_with_nothing_pending_is_removed_from_its_group(self):
        bus = yield self.make_bus()
        yield bus.execute("XGROUP", "CREATE", stream_key("alarm"), AYS_GROUP, "0", "MKSTREAM")
        yield bus.execute("XGROUP", "CREATECONSUMER", stream_key("alarm"), AYS_GROUP, "gone-long-ago")
        self.assertIn("gone-long-ago", (yield consumers_of(bus, AYS_GROUP)))
        yield self.start(bus, Recorder(), "alive")  # its first beat judges the others
        self.assertNotIn("gone-long-ago", (yield consumers_of(bus, AYS_GROUP)))

    @inlineCallbacks
    def test_a_slow_consumer_keeps_beating_and_keeps_its_entries(self):
        slow_bus = yield self.make_bus()
        other_bus = yield self.make_bus()
        yield self.publish(slow_bus, 1)
        slow_handler = Recorder(hold=True)  # a long action
        slow = yield self.start(slow_bus, slow_handler, "slow")
        yield slow_handler.wait(1)
        other_seen = Recorder()
        other = yield self.start(other_bus, other_seen, "other")
        for _ in range(3 * 5):  # three timeouts' worth of beats on both sides
            self.redis.command("PEXPIRE", slow.heartbeat_key, "1000")  # each beat must renew it
            slow_bus.clock.advance(slow.beat_interval)
            yield slow_bus.execute("PING")
            self.assertGreater(self.pttl(slow.heartbeat_key), 9000)
            other_bus.clock.advance(other.beat_interval)
            self.assertEqual(0, (yield other.take_over()))
        self.assertEqual([], other_seen.seen)
        slow_handler.held[0].callback(None)
        yield slow.when_handled(1)
        self.assertEqual(0, (yield other_bus.pending(AYS_GROUP)))

    @inlineCallbacks
    def test_after_its_beat_failed_a_consumer_gives_the_others_a_whole_timeout_to_beat_again(self):
        first_bus = yield self.make_bus()
        late_bus = yield self.make_bus()
        yield self.publish(late_bus, 2)
        late_handler = Recorder(hold=True)
        late = yield self.start(late_bus, late_handler, "late")
        yield late_handler.wait(2)
        first_seen = Recorder()
        first = yield self.start(first_bus, first_seen, "first")
        # cut off from Redis for so long that every heartbeat in it lapsed; the first one back
        # must not take the others for dead before they could beat again
        first_bus.connection().transport.loseConnection()
        yield first_bus.when_disconnected()
        yield self.assertFailure(first.take_over(), BusUnavailable)
        self.redis.command("DEL", late.heartbeat_key)
        yield first_bus.when_connected()
        for _ in range(BEATS_PER_TIMEOUT):
            first_bus.clock.advance(first.beat_interval)
            yield first_bus.execute("PING")  # after the beat's round trip
        late_bus.clock.advance(late.beat_interval)  # back in time
        yield late_bus.execute("PING")
        first_bus.clock.advance(first.beat_interval)  # a whole timeout of beats: now it judges
        yield first_bus.execute("PING")
        self.assertEqual([], first_seen.seen)
        # the late one dies for good now: the next beat takes its entries
        yield crash(late)
        self.redis.command("DEL", late.heartbeat_key)
        first_bus.clock.advance(first.beat_interval)
        yield first_seen.wait(2)
        self.assertNotIn("late", (yield consumers_of(first_bus, AYS_GROUP)))

    @inlineCallbacks
    def test_a_stop_with_unfinished_entries_ends_the_heartbeat_and_the_others_take_them_at_once(self):
        leaving_bus = yield self.make_bus()
        staying_bus = yield self.make_bus()
        yield self.publish(leaving_bus, 3)
        held = Recorder(hold=True)
        leaving = yield self.start(leaving_bus, held, "leaving")
        yield held.wait(3)
        staying_seen = Recorder()
        staying = yield self.start(staying_bus, staying_seen, "staying")
        yield leaving.stopService()  # drain_timeout 0: the three are left pending
        self.assertEqual("0", self.redis.command("EXISTS", leaving.heartbeat_key).split()[-1])
        self.assertEqual(3, (yield consumers_of(staying_bus, AYS_GROUP))["leaving"])  # still holds them
        staying_bus.clock.advance(staying.beat_interval)  # its next beat, not claim_idle later
        yield staying_seen.wait(3)
        yield staying_bus.execute("PING")
        self.assertEqual({"staying": 0}, (yield consumers_of(staying_bus, AYS_GROUP)))
        self.assertEqual(0, (yield staying_bus.pending(AYS_GROUP)))
        self.flushLoggedErrors(defer.CancelledError)


class RedisFaultTests(TestCase):
    """Stopping and restarting a server of this test's own."""

    timeout = 20

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.bus = RedisBus(RedisSection(url=self.redis.url, timeout=2.0), reactor=reactor)
        self.bus.metrics = Metrics(process=False)  # a refused publish is not counted
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        return self.bus.when_connected()

    @inlineCallbacks
    def test_publish_fails_fast_while_redis_is_down_and_works_after(self):
        live = []
        self.bus.subscribe(live.append)
        yield self.bus.when_live()
        self.redis.stop()
        yield self.bus.when_disconnected()
        started = reactor.seconds()
        failure = yield self.assertFailure(self.bus.publish(alarm()), BusUnavailable)
        self.assertLess(reactor.seconds() - started, 0.5)
        self.assertIn("not reachable", str(failure))
        self.assertFalse(self.bus.health()["ok"])
        self.assertNotIn(b"cockpit_events_published_total{", self.bus.metrics.render())
        self.redis.start()
        yield self.bus.when_connected()
        yield self.bus.when_live()
        arrived = Deferred()
        # fired a turn later, so that every subscriber has had the event first
        self.bus.subscribe(lambda e: arrived.called or reactor.callLater(0, arrived.callback, e))
        event = alarm(2)
        yield self.bus.publish(event)
        got = yield arrived
        self.assertEqual(event.guid, got.guid)
        self.assertEqual([event.guid], [e.guid for e in live])  # resubscribed after the reconnect
        self.assertTrue(self.bus.health()["ok"])

    @inlineCallbacks
    def test_marks_fail_fast_while_redis_is_down(self):
        self.redis.stop()
        yield self.bus.when_disconnected()
        yield self.assertFailure(self.bus.recall("ckpt.test.x"), BusUnavailable)
        yield self.assertFailure(self.bus.remember("ckpt.test.x", "g", 60), BusUnavailable)

    @inlineCallbacks
    def test_publish_to_a_hung_redis_fails_after_the_timeout(self):
        self.redis.process.send_signal(signal.SIGSTOP)
        try:
            started = reactor.seconds()
            yield self.assertFailure(self.bus.publish(alarm()), BusUnavailable)
            self.assertLess(reactor.seconds() - started, 2.0 + 1.0)  # [redis] timeout = 2.0
        finally:
            self.redis.process.send_signal(signal.SIGCONT)
        yield self.bus.when_connected()
        yield self.bus.publish(alarm(2))

    @inlineCallbacks
    def test_consumer_carries_on_after_a_redis_restart(self):
        recorder = Recorder()
        consumer = self.bus.consumer(AYS_GROUP, recorder, drain_timeout=0)
        consumer.block_ms = 100
        consumer.startService()
        self.addCleanup(consumer.stopService)
        yield self.bus.publish(alarm(1))
        yield recorder.wait(1)
        self.redis.stop()
        yield self.bus.when_disconnected()
        self.redis.start()
        yield self.bus.when_connected()
        event = alarm(2)
        yield self.bus.publish(event)
        yield recorder.wait(2)
        self.assertEqual(event.guid, recorder.seen[1][0])


class RedisAwayAckTests(TestCase):
    """What a consumer handled while Redis was away is acknowledged once it is back, not handled again."""

    timeout = 30

    @inlineCallbacks
    def test_an_acknowledgement_that_failed_is_sent_at_the_next_beat_and_nothing_is_handled_twice(self):
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        server.command("CONFIG", "SET", "save", "3600 1")  # it saves its data as it stops, and reads it back
        clock = Clock()
        bus = RedisBus(RedisSection(url=server.url), clock=clock, reactor=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        yield bus.when_connected()
        yield bus.publish(alarm(1))
        recorder = Recorder(hold=True)
        consumer = bus.consumer(AYS_GROUP, recorder, types=["alarm"], drain_timeout=0)
        consumer.block_ms = 100
        consumer.startService()
        self.addCleanup(lambda: consumer.stopService() if consumer.running else None)
        yield recorder.wait(1)
        server.stop()
        yield bus.when_disconnected()
        recorder.held[0].callback(None)  # handled while Redis is away: the acknowledgement cannot go
        yield task.deferLater(reactor, 0, lambda: None)  # acknowledgements leave at the end of the turn
        self.assertEqual(1, len(consumer.owed_acks))
        server.start()
        yield bus.when_connected()
        self.assertEqual(1, (yield bus.pending(AYS_GROUP, ["alarm"])))
        yield consumer.take_over()  # its next beat
        self.assertEqual(set(), consumer.owed_acks)
        self.assertEqual(0, (yield bus.pending(AYS_GROUP, ["alarm"])))
        yield consumer.reclaim()
        self.assertEqual(1, len(recorder.seen))  # never handed out again


def within(d: Deferred, seconds: float, what: str) -> Deferred:
    """``d``, failed with a sentence instead of left waiting when it has not fired after ``seconds``."""
    def late(failure):
        failure.trap(defer.TimeoutError)
        raise AssertionError(f"{what} did not come within {seconds} s")

    return d.addTimeout(seconds, reactor).addErrback(late)


class RedisOutageRecoveryTests(TestCase):
    """After Redis crashed and came back, what it holds for a consumer that the consumer does not
    handle is handed out again at once, not ``claim_idle`` later (when only a reclaim finds it)."""

    timeout = 30

    def setUp(self):
        # a crash keeps what Redis acknowledged, as in a deployment that must lose nothing
        self.redis = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
        self.addCleanup(self.redis.cleanup)

    @inlineCallbacks
    def make_bus(self, clock=reactor):
        bus = RedisBus(RedisSection(url=self.redis.url, claim_idle=60.0, consumer_timeout=1.0),
                       clock=clock, reactor=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        yield bus.when_connected()
        return bus

    @inlineCallbacks
    def start(self, bus, handler):
        consumer = bus.consumer(AYS_GROUP, handler, types=["alarm"], drain_timeout=0)
        consumer.block_ms = 100
        consumer.startService()
        self.addCleanup(lambda: consumer.stopService() if consumer.running else None)
        yield consumer.when_ready()
        return consumer

    @inlineCallbacks
    def test_an_entry_whose_handler_met_redis_down_is_handed_out_again_at_the_first_beat_after_it_is_back(self):
        clock = Clock()  # beats and reclaims only when this test says
        bus = yield self.make_bus(clock)
        held = Recorder(hold=True)
        consumer = yield self.start(bus, held)
        yield bus.publish(alarm(1))
        yield held.wait(1)
        self.redis.kill()
        yield bus.when_disconnected()
        # as the robot's lookup of the runs already done fails while Redis is down
        held.held[0].errback(BusUnavailable("Redis is not reachable"))
        self.redis.start()
        yield bus.when_connected()
        yield consumer.take_over()  # its first beat since Redis is back
        self.assertEqual(2, len(held.seen), "the entry was not handed out again at the first beat")
        self.assertEqual([1, 2], [deliveries for _, deliveries in held.seen])
        held.held[1].callback(None)
        yield held.wait(2)
        yield bus.execute("PING")  # after its acknowledgement's round trip
        self.assertEqual(0, (yield bus.pending(AYS_GROUP, ["alarm"])))

    @inlineCallbacks
    def test_an_entry_the_bus_refused_to_its_handler_is_handed_out_again_at_the_next_beat(self):
        clock = Clock()
        bus = yield self.make_bus(clock)
        held = Recorder(hold=True)
        consumer = yield self.start(bus, held)
        yield bus.publish(alarm(1))
        yield held.wait(1)
        held.held[0].errback(BusUnavailable("Redis refused the write"))  # Redis itself stays up
        yield consumer.take_over()
        self.assertEqual([1, 2], [deliveries for _, deliveries in held.seen])
        held.held[1].callback(None)
        yield held.wait(2)
        yield bus.execute("PING")
        self.assertEqual(0, (yield bus.pending(AYS_GROUP, ["alarm"])))

    @inlineCallbacks
    def test_entries_a_crash_delivered_to_a_consumer_without_its_reply_are_handled_once_redis_is_back(self):
        bus = yield self.make_bus()
        recorder = Recorder()
        consumer = yield self.start(bus, recorder)
        yield bus.publish(alarm(1))
        yield recorder.wait(1)
        self.redis.kill()
        self.redis.start()
        # Redis wrote the delivery to its log but died before the reply left: the entry is pending
        # for the consumer, which never got it
        lost = alarm(2)
        self.redis.command("XADD", stream_key("alarm"), "*", "event", lost.to_json().decode())
        delivered = self.redis.command("XREADGROUP", "GROUP", AYS_GROUP, consumer.consumer_name,
                                       "COUNT", "10", "STREAMS", stream_key("alarm"), ">")
        self.assertIn(lost.guid, delivered)
        yield within(recorder.wait(2), 10.0, "the entry delivered without its reply")
        self.assertEqual([(lost.guid, 2)], recorder.seen[1:])
        yield bus.execute("PING")
        self.assertEqual(0, (yield bus.pending(AYS_GROUP, ["alarm"])))

    @inlineCallbacks
    def test_entries_waiting_for_the_handlers_view_are_not_taken_back_from_under_it(self):
        clock = Clock()
        bus = yield self.make_bus(clock)
        gate, asked = Deferred(), Deferred()

        def before_dispatch():
            if asked.called:
                return defer.succeed(None)
            asked.callback(None)
            return gate  # the view catches up only when this test says

        recorder = Recorder()
        consumer = bus.consumer(AYS_GROUP, recorder, types=["alarm"], drain_timeout=0,
                                before_dispatch=before_dispatch)
        consumer.block_ms = 100
        consumer.startService()
        self.addCleanup(lambda: consumer.stopService() if consumer.running else None)
        yield consumer.when_ready()
        yield bus.publish(alarm(1))
        yield asked  # read, and waiting for the view to catch up
        self.redis.kill()
        yield bus.when_disconnected()
        yield self.assertFailure(consumer.take_over(), BusUnavailable)
        self.redis.start()
        yield bus.when_connected()
        yield consumer.take_over()  # takes back what nobody here has in hand: not this entry
        self.assertEqual([], recorder.seen)
        gate.callback(None)
        yield recorder.wait(1)
        self.assertEqual([1], [deliveries for _, deliveries in recorder.seen])


class UnlessLostTests(TestCase):
    """A user whose own connection failed reports it only if the bus does not say it lost Redis."""

    def setUp(self):
        self.clock = Clock()
        self.bus = MemoryBus(clock=self.clock)
        self.bus.startService()
        self.reported: list[str] = []

    def test_a_failure_of_ones_own_is_reported_after_the_grace(self):
        self.bus.unless_lost(lambda: self.reported.append("cannot read"))
        self.clock.advance(0.9)
        self.assertEqual([], self.reported)
        self.clock.advance(0.1)
        self.assertEqual(["cannot read"], self.reported)

    def test_an_outage_the_bus_reports_within_the_grace_is_not_reported_again(self):
        self.bus.unless_lost(lambda: self.reported.append("cannot read"))
        self.bus.outages += 1  # the bus noticed second, and said it lost Redis
        self.clock.advance(5)
        self.assertEqual([], self.reported)

    def test_a_stopped_bus_reports_nothing_and_leaves_no_timer(self):
        self.bus.unless_lost(lambda: self.reported.append("cannot read"))
        self.bus.stopService()
        self.assertEqual([], self.clock.getDelayedCalls())
