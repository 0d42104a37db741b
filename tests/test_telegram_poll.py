"""The long-poller: offsets across restarts, 429s, outages, 409s and the lease between processes."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.redis import RedisBus
from cockpit.config import RedisSection
from cockpit.telegram import TelegramBot
from cockpit.backends.embedded.telegram import FileBotState
from cockpit.backends.redis.telegram import RedisBotState, RedisLease, redis_key
from cockpit.bus import BusUnavailable
from cockpit.telegram_poll import UpdatePoller
from tests.fake_telegram import FakeTelegram, FakeTelegramServer, User
from tests.redis_server import shared_server, started_bus
from tests.test_telegram_api import TOKEN, real_client
from tests.wiring import backend_for

ALICE = User(1001, "alice", "Alice")


def next_wait(poller: UpdatePoller) -> defer.Deferred:
    """``poller.next_wait()``, delivered a reactor turn later: by then the poller's loop has
    yielded its sleep, so advancing the clock moves the poller on."""
    return poller.next_wait().addCallback(lambda wait: task.deferLater(reactor, 0, lambda: wait))


class Recorder:
    """An update handler that remembers the update ids it was given."""

    def __init__(self):
        self.ids: list[int] = []

    def __call__(self, update):
        self.ids.append(update["update_id"])


class PollerHarness:
    def setUp(self):
        self.clock = Clock()
        self.fake = FakeTelegram(TOKEN, clock=self.clock)
        self.server = FakeTelegramServer(self.fake).start()
        self.addCleanup(self.server.stop)
        self.api = real_client(self, self.server.url, self.clock)
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def poller(self, state=None, lease=None, handler=None) -> UpdatePoller:
        state = state or FileBotState(Path(self.mktemp()), "123456")
        poller = UpdatePoller(self.api, state, handler or Recorder(), self.clock, lease=lease)
        self.addCleanup(lambda: poller.stopService() if poller.running else None)
        return poller

    def log_text(self) -> str:
        from twisted.logger import formatEvent
        return "\n".join(formatEvent(e) for e in self.logged)


class PollerTests(PollerHarness, TestCase):
    @inlineCallbacks
    def test_updates_are_handled_in_order_and_the_offset_advances(self):
        handler = Recorder()
        poller = self.poller(handler=handler)
        ids = [self.fake.message(ALICE, f"/help {n}")["update_id"] for n in range(3)]
        poller.startService()
        yield poller.when_handled(3)
        self.assertEqual(handler.ids, ids)
        self.assertEqual(poller.offset, ids[-1] + 1)
        # the next long poll confirms them at the fake
        yield self.fake.wait_for("getUpdates", 2)
        self.assertEqual(self.fake.calls[-1][1]["offset"], ids[-1] + 1)
        self.assertEqual(self.fake.updates, [])

    @inlineCallbacks
    def test_429_makes_the_poller_wait_retry_after(self):
        poller = self.poller()
        self.fake.fail_next("getUpdates", 429, retry_after=7)
        waiting = next_wait(poller)
        poller.startService()
        self.assertEqual((yield waiting), ("429 Too Many Requests", 7))
        self.assertEqual(poller.attempts, 1)
        self.clock.advance(6.9)
        self.assertEqual(poller.attempts, 1)
        self.clock.advance(0.1)
        self.assertEqual(poller.attempts, 2)
        self.fake.message(ALICE, "/help")
        yield poller.when_handled(1)

    @inlineCallbacks
    def test_api_down_for_30_seconds_the_poller_recovers_by_itself(self):
        handler = Recorder()
        poller = self.poller(handler=handler)
        yield self.server.stop()
        down_for = 0.0
        waits = []
        while True:
            waiting = next_wait(poller)
            if not poller.running:
                poller.startService()
            reason, seconds = yield waiting
            waits.append(seconds)
            self.assertEqual(reason, "network failure")
            if down_for + seconds >= 30:
                self.server.start()  # back, on the same port
                update = self.fake.message(ALICE, "/help")
                self.clock.advance(seconds)
                break
            self.clock.advance(seconds)
            down_for += seconds
        yield poller.when_handled(1)
        self.assertEqual(handler.ids, [update["update_id"]])
        self.assertEqual(waits, [1, 2, 4, 8, 16])  # doubling from 1 s
        self.assertIn("the Telegram API answers again", self.log_text())

    @inlineCallbacks
    def test_backoff_is_capped(self):
        poller = self.poller()
        yield self.server.stop()
        self.addCleanup(self.server.start)
        waits = []
        for _ in range(8):
            waiting = next_wait(poller)
            if not poller.running:
                poller.startService()
            waits.append((yield waiting)[1])
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30, 30])

    @inlineCallbacks
    def test_409_is_logged_clearly_and_polling_resumes(self):
        poller = self.poller()
        poller.startService()
        yield self.fake.wait_for("getUpdates", 1)
        waiting = next_wait(poller)
        intruder = real_client(self, self.server.url, self.clock)
        other = intruder.get_updates(None)  # another bot instance with the same token
        reason, seconds = yield waiting
        self.assertEqual(reason, "409 Conflict")
        self.assertIn("409 Conflict", self.log_text())
        self.assertIn("another process polls this bot's token", self.log_text())
        other.cancel()
        yield self.assertFailure(other, defer.CancelledError)
        self.clock.advance(seconds)
        self.fake.message(ALICE, "/help")
        yield poller.when_handled(1)

    @inlineCallbacks
    def test_bad_token_stops_polling_with_a_clear_error(self):
        api = real_client(self, self.server.url, self.clock, token="123456:not-the-token")
        poller = UpdatePoller(api, FileBotState(Path(self.mktemp()), "123456"), Recorder(), self.clock)
        poller.startService()
        self.addCleanup(poller.stopService)
        yield poller._loop
        self.assertEqual(poller.status, "stopped: bad token")
        self.assertIn("Telegram refused the bot token (401 Unauthorized)", self.log_text())
        self.assertNotIn("not-the-token", self.log_text())

    @inlineCallbacks
    def test_stop_cancels_the_long_poll(self):
        poller = self.poller()
        poller.startService()
        yield self.fake.wait_for("getUpdates", 1)
        self.assertTrue(self.fake.polling)
        yield poller.stopService()
        yield self.server.factory.when_idle()
        self.assertFalse(self.fake.polling)
        self.assertEqual(poller.status, "stopped")

    @inlineCallbacks
    def test_a_failing_handler_skips_its_update_and_goes_on(self):
        seen = []

        def handler(update):
            seen.append(update["update_id"])
            if len(seen) == 1:
                raise RuntimeError("a bug in a command")

        poller = self.poller(handler=handler)
        first = self.fake.message(ALICE, "one")["update_id"]
        second = self.fake.message(ALICE, "two")["update_id"]
        poller.startService()
        yield poller.when_handled(2)
        self.assertEqual(seen, [first, second])
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_a_bus_away_for_more_than_a_thousand_retries_still_keeps_the_update(self):
        # 2 ** 1024 does not fit in a float: a doubling computed before its cap overflowed there
        attempts = []

        def handler(update):
            attempts.append(update["update_id"])
            if len(attempts) <= 1100:
                raise BusUnavailable("Redis is away")

        poller = self.poller(handler=handler)
        update = self.fake.message(ALICE, "/help")["update_id"]
        waiting = next_wait(poller)  # each retry comes within the clock's advance: watch before it
        poller.startService()
        waits = []
        while len(attempts) <= 1100:
            # the poller's loop ends only at a stop, or when it fails: then no wait would ever come
            waited = yield defer.DeferredList([waiting, poller._loop], fireOnOneCallback=True,
                                              fireOnOneErrback=True, consumeErrors=True)
            self.assertEqual(0, waited[1], f"the poller's loop ended after {len(attempts)} attempts")
            waits.append(waited[0][1])
            waiting = next_wait(poller)
            self.clock.advance(waits[-1])
        yield poller.when_handled(1)
        self.assertEqual({update}, set(attempts))
        self.assertEqual([1, 2, 4, 8, 16, 30], waits[:6])
        self.assertEqual({30}, set(waits[5:]))
        self.assertTrue(poller.running)


def bot_config(data_dir: str, api_url: str, redis_url=None, **bot):
    data = {"cockpit": {"data_dir": data_dir},
            "bot": {"token": TOKEN, "api_url": api_url, "allowed_users": [ALICE.id], **bot}}
    if redis_url:
        data["redis"] = {"url": redis_url}
    return config.from_dict(data)


class RestartHarness(PollerHarness):
    """Restarts a whole TelegramBot in the middle of a stream of updates."""

    @inlineCallbacks
    def restart_in_the_middle(self, bus, cfg):
        first_batch = [self.fake.message(ALICE, "/repo list")["update_id"] for _ in range(25)]
        bot = TelegramBot(cfg, backend_for(bus, cfg.data_dir), self.clock, http=self.api.http)
        bot.startService()
        yield bot.poller.when_handled(10)
        yield bot.stopService()  # the update being handled finishes; the rest wait for the next process
        handled_before = bot.poller.handled
        self.assertLess(handled_before, 25)
        second_batch = [self.fake.message(ALICE, "/repo list")["update_id"] for _ in range(15)]
        again = TelegramBot(cfg, backend_for(bus, cfg.data_dir), self.clock, http=self.api.http)
        again.startService()
        self.addCleanup(again.stopService)
        yield again.poller.when_handled(40 - handled_before)
        events = yield bus.recent("telegram", limit=1000)
        guids = [event.guid for _, event in events]
        self.assertEqual(len(guids), 40)  # none lost, none twice
        expected = {bot.commands._chat(i, {"id": ALICE.id}, {"id": ALICE.id}).guid()
                    for i in first_batch + second_batch}
        self.assertEqual(set(guids), expected)
        return second_batch[-1]


class FileRestartTests(RestartHarness, TestCase):
    @inlineCallbacks
    def test_restart_with_the_embedded_bus_neither_repeats_nor_loses_updates(self):
        bus = MemoryBus(clock=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        yield self.restart_in_the_middle(bus, bot_config(self.mktemp(), self.server.url))

    @inlineCallbacks
    def test_offset_file_survives_a_new_state_object(self):
        directory = Path(self.mktemp())
        state = FileBotState(directory, "123456")
        yield state.load()
        yield state.save_offset(42)
        yield state.set_current_repo(7, "demo")
        self.assertTrue((yield state.first_refusal(9)))
        reread = FileBotState(directory, "123456")
        self.assertEqual((yield reread.offset()), 42)
        self.assertEqual((yield reread.current_repo(7)), "demo")
        self.assertFalse((yield reread.first_refusal(9)))
        self.assertEqual([p.name for p in directory.iterdir()], ["123456.json"])  # no temp file left


class RedisHarness(RestartHarness):
    def setUp(self):
        super().setUp()
        self.redis = shared_server()
        self.redis.flush()

    @inlineCallbacks
    def redis_bus(self) -> RedisBus:
        bus = yield started_bus(self, url=self.redis.url)
        return bus


class RedisPollerTests(RedisHarness, TestCase):
    timeout = 20
    @inlineCallbacks
    def test_restart_with_redis_neither_repeats_nor_loses_updates(self):
        bus = yield self.redis_bus()
        last = yield self.restart_in_the_middle(bus, bot_config(self.mktemp(), self.server.url, self.redis.url))
        self.assertEqual(self.redis.command("GET", redis_key("123456", "offset")).strip(), f'"{last + 1}"')

    @inlineCallbacks
    def test_state_in_redis(self):
        bus = yield self.redis_bus()
        state = RedisBotState(bus, "123456")
        self.assertIsNone((yield state.offset()))
        yield state.save_offset(77)
        self.assertEqual((yield state.offset()), 77)
        yield state.set_current_repo(5, "demo")
        self.assertEqual((yield state.current_repo(5)), "demo")
        yield state.set_current_repo(5, None)
        self.assertIsNone((yield state.current_repo(5)))
        self.assertTrue((yield state.first_refusal(8)))
        self.assertFalse((yield state.first_refusal(8)))

    @inlineCallbacks
    def test_two_processes_sharing_a_token_only_one_polls(self):
        pollers = []
        for _ in range(2):
            bus = yield self.redis_bus()  # one connection each, as two processes would have
            lease = RedisLease(bus, "123456", self.clock)
            pollers.append(self.poller(state=RedisBotState(bus, "123456"), lease=lease))
        standby = [next_wait(p) for p in pollers]
        for p in pollers:
            p.startService()
        yield self.fake.wait_for("getUpdates", 1)
        reason, seconds = yield defer.DeferredList(standby, fireOnOneCallback=True).addCallback(lambda r: r[0])
        self.assertEqual(reason, "another process polls")
        holder, other = sorted(pollers, key=lambda p: -p.attempts)
        self.assertEqual((holder.attempts, other.attempts), (1, 0))
        # the standby keeps asking; the lease is renewed by its holder meanwhile
        for _ in range(3):
            waiting = next_wait(other)
            self.clock.advance(seconds)
            yield waiting
        self.assertEqual(other.attempts, 0)
        self.assertEqual(self.fake.conflicts, 0)
        self.assertEqual(self.fake.count("getUpdates"), holder.attempts)  # every poll was the holder's
        # the holder stops and lets go: the other takes over at its next try
        yield holder.stopService()
        self.assertEqual(self.redis.command("GET", redis_key("123456", "lease")).strip(), "(nil)")
        polls = self.fake.count("getUpdates")
        self.clock.advance(seconds)
        yield self.fake.wait_for("getUpdates", polls + 1)
        self.assertEqual(other.attempts, 1)
        update = self.fake.message(ALICE, "/help")
        yield other.when_handled(1)
        self.assertEqual(other.offset, update["update_id"] + 1)
        self.assertEqual(self.fake.conflicts, 0)

    @inlineCallbacks
    def test_a_standby_that_takes_the_lease_polls_from_the_stored_offset(self):
        pollers, handlers = [], []
        for _ in range(2):
            bus = yield self.redis_bus()
            handlers.append(Recorder())
            pollers.append(self.poller(state=RedisBotState(bus, "123456"), lease=RedisLease(bus, "123456", self.clock),
                                       handler=handlers[-1]))
        standby = [next_wait(p) for p in pollers]
        for p in pollers:
            p.startService()
        _, seconds = yield defer.DeferredList(standby, fireOnOneCallback=True).addCallback(lambda r: r[0])
        holder, other = sorted(pollers, key=lambda p: -p.attempts)
        self.assertIsNone(other.offset)  # what it read at its start
        ids = [self.fake.message(ALICE, f"/help {n}")["update_id"] for n in range(3)]
        yield holder.when_handled(3)
        # it stops before its next poll could confirm them to Telegram: only the stored offset says
        # they are done
        yield holder.stopService()
        polls = self.fake.count("getUpdates")
        self.clock.advance(seconds)
        yield self.fake.wait_for("getUpdates", polls + 1)
        self.assertEqual(self.fake.calls[-1][1]["offset"], ids[-1] + 1)
        later = self.fake.message(ALICE, "/help later")["update_id"]
        yield other.when_handled(1)
        self.assertEqual(handlers[pollers.index(other)].ids, [later])  # none of the holder's again

    @inlineCallbacks
    def test_a_poller_that_loses_its_lease_stops_polling(self):
        bus = yield self.redis_bus()
        lease = RedisLease(bus, "123456", self.clock)
        poller = self.poller(state=RedisBotState(bus, "123456"), lease=lease)
        poller.startService()
        yield self.fake.wait_for("getUpdates", 1)
        # the lease expired (this process hung) and another process took it
        self.redis.command("SET", lease.key, "someone-else")
        waiting = next_wait(poller)
        self.clock.advance(lease.ttl / 3)  # renewal time
        reason, _ = yield waiting
        self.assertEqual(reason, "another process polls")
        yield self.server.factory.when_idle()
        self.assertFalse(self.fake.polling)

    @inlineCallbacks
    def test_the_embedded_bus_needs_no_lease(self):
        cfg = bot_config(self.mktemp(), self.server.url)
        bot = TelegramBot(cfg, backend_for(MemoryBus(clock=self.clock), cfg.data_dir), self.clock,
                          http=self.api.http)
        self.assertIsNone(bot.poller.lease)
        redis_bot = TelegramBot(bot_config(self.mktemp(), self.server.url, self.redis.url),
                                backend_for(RedisBus(RedisSection(url=self.redis.url), clock=self.clock, reactor=reactor)),
                                self.clock, http=self.api.http)
        self.assertIsNotNone(redis_bot.poller.lease)
        yield defer.succeed(None)
