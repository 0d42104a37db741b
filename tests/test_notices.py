"""Notices (docs/design.md §11): once per change of a group, repeats, across processes, and the chat's buttons."""
from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit.backends.embedded import MemoryBus
from cockpit.backends.redis import RedisBus
from cockpit.config import RedisSection
from cockpit.events import AlarmEvent, EcoEvent
from cockpit.notices import Notifier, notice_text
from cockpit.telegram import TelegramBot
from tests.redis_server import shared_server
from tests.test_telegram import ALICE, BOB, OPS_CHAT, BotCase
from tests.wiring import backend_for

FIRING = {"service": "node!web1", "method": "HighLoad", "msg": "load is high", "fingerprint": "f00d",
          "severity": "critical"}
ECO = {"app_name": "shop", "eco_type": "KeyError", "func_filename": "pay.py", "func_name": "charge", "line_nbr": 4,
       "error_msg": "order 12 lost"}
REPEAT = 3600.0


class Recorder:
    """A channel that keeps what it is told; ``fail`` makes it refuse (as an unreachable chat API would)."""

    def __init__(self):
        self.told: list[tuple[str, str, str]] = []
        self.fail = False

    def notify(self, kind, group, reason):
        if self.fail:
            return defer.fail(RuntimeError("the chat cannot be reached"))
        self.told.append((kind, group["id"], reason))
        return defer.succeed(None)


class NotifierBehaviour:
    def make_bus(self):
        raise NotImplementedError

    def prepare(self):
        """Before the stores are made."""

    @inlineCallbacks
    def setUp(self):
        self.prepare()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.stores, self.silence_stores = [], []
        for _ in range(self.processes):
            store, silences = yield self.make_store()
            self.stores.append(store)
            self.silence_stores.append(silences)
        self.channel = Recorder()
        self.notifiers = [Notifier(store, [self.channel], self.clock, repeat=REPEAT, silences=silences)
                          for store, silences in zip(self.stores, self.silence_stores)]
        self.store = self.stores[0]

    processes = 1

    @inlineCallbacks
    def make_store(self):
        bus = self.make_bus()
        bus.startService()
        self.addCleanup(bus.stopService)
        if bus.remote:
            yield bus.when_connected()
        backend = backend_for(bus)
        return backend.group_store(self.clock), backend.silences(self.clock)

    @inlineCallbacks
    def tick(self, seconds: float = 0):
        self.clock.advance(seconds)
        for notifier in self.notifiers:
            yield notifier.tick()

    @inlineCallbacks
    def test_an_alarm_is_noticed_when_it_opens_and_resolves_and_never_per_repeat(self):
        yield self.store.record(AlarmEvent(**FIRING, epoch=100))
        yield self.tick()
        [(kind, group_id, reason)] = self.channel.told
        self.assertEqual(("alarm", "opened"), (kind, reason))
        for n in range(20):
            yield self.store.record(AlarmEvent(**FIRING, epoch=101 + n))
            yield self.tick(1)
        self.assertEqual(1, len(self.channel.told))
        yield self.store.record(AlarmEvent(**FIRING, epoch=200, status="resolved"))
        yield self.tick()
        self.assertEqual([("alarm", group_id, "resolved")], self.channel.told[1:])
        yield self.tick(REPEAT * 3)  # resolved: no repeat
        self.assertEqual(2, len(self.channel.told))
        yield self.store.record(AlarmEvent(**FIRING, epoch=300))
        yield self.tick()
        self.assertEqual(("alarm", group_id, "reopened"), self.channel.told[-1])

    @inlineCallbacks
    def test_an_open_group_is_noticed_again_after_repeat_until_it_is_acked(self):
        yield self.store.record(AlarmEvent(**FIRING))
        yield self.tick()
        yield self.tick(REPEAT - 1)
        self.assertEqual(["opened"], [r for _, _, r in self.channel.told])
        yield self.tick(1)
        self.assertEqual(["opened", "repeat"], [r for _, _, r in self.channel.told])
        group_id = self.channel.told[0][1]
        yield self.store.act("alarm", group_id, "ack", "alice")
        yield self.tick(REPEAT * 2)
        self.assertEqual(2, len(self.channel.told))
        self.assertEqual(2, (yield self.store.get("alarm", group_id))["notices"])

    @inlineCallbacks
    def test_a_notified_eco_is_alert(self):
        yield self.store.record(EcoEvent(**ECO))
        groups, _ = yield self.store.page("eco", 10, None)
        self.assertEqual("NEW", groups[0]["state"])
        yield self.tick()
        self.assertEqual("ALERT", (yield self.store.get("eco", groups[0]["id"]))["state"])
        self.assertEqual([("eco", groups[0]["id"], "opened")], self.channel.told)

    @inlineCallbacks
    def test_a_notice_that_could_not_be_sent_is_sent_after_its_lease(self):
        yield self.store.record(AlarmEvent(**FIRING))
        self.channel.fail = True
        yield self.tick()
        self.assertEqual(1, self.notifiers[0].failed)
        self.channel.fail = False
        yield self.tick(1)
        self.assertEqual([], self.channel.told)  # leased still
        yield self.tick(self.notifiers[0].lease)
        self.assertEqual(["opened"], [r for _, _, r in self.channel.told])

    @inlineCallbacks
    def test_a_close_stops_the_repeats_and_a_reopen_by_hand_is_noticed(self):
        yield self.store.record(AlarmEvent(**FIRING))
        yield self.tick()
        group_id = self.channel.told[0][1]
        yield self.store.act("alarm", group_id, "close", "bob")
        yield self.tick(REPEAT * 2)
        self.assertEqual(1, len(self.channel.told))
        yield self.store.act("alarm", group_id, "reopen", "bob")
        yield self.tick()
        self.assertEqual(("alarm", group_id, "reopened"), self.channel.told[-1])


    @inlineCallbacks
    def test_under_a_silence_a_group_is_counted_without_a_notice_and_noticed_once_when_it_ends(self):
        from cockpit.silences import NewSilence

        yield self.silence_stores[-1].add(NewSilence(matchers={"service": "node!web*"}, duration=600,
                                                     created_by="ops"), self.clock.seconds())
        for n in range(5):
            yield self.store.record(AlarmEvent(**FIRING, epoch=100 + n))
            yield self.tick(1)
        yield self.store.record(AlarmEvent(**{**FIRING, "service": "db!main", "fingerprint": "other"}))
        yield self.tick(1)
        self.assertEqual(["opened"], [r for _, _, r in self.channel.told])  # only the group not silenced
        self.assertEqual(1, sum(n.held for n in self.notifiers))
        groups, _ = yield self.store.page("alarm", 10, None, sort="count")
        self.assertEqual(5, groups[0]["count"])
        yield self.tick(600)
        for _ in range(3):
            yield self.tick(1)
        self.assertEqual([("alarm", groups[0]["id"], "silence ended")], self.channel.told[1:])

    @inlineCallbacks
    def test_a_group_that_ended_under_its_silence_gets_no_notice_when_it_ends(self):
        from cockpit.silences import NewSilence

        yield self.silence_stores[0].add(NewSilence(matchers={"method": "High*"}, duration=600), self.clock.seconds())
        yield self.store.record(AlarmEvent(**FIRING, epoch=100))
        yield self.tick()
        yield self.store.record(AlarmEvent(**FIRING, epoch=200, status="resolved"))
        yield self.tick()
        yield self.tick(601)
        self.assertEqual([], self.channel.told)


class MemoryNotifierTests(NotifierBehaviour, TestCase):
    def make_bus(self):
        return MemoryBus(clock=reactor)


class RedisNotifierTests(NotifierBehaviour, TestCase):
    timeout = 20

    def prepare(self):
        self.redis = shared_server()
        self.redis.flush()

    def make_bus(self):
        return RedisBus(RedisSection(url=self.redis.url), reactor=reactor)


class TwoProcessNotifierTests(RedisNotifierTests):
    """Two cockpits on one Redis, each with its notifier: every notice goes out once between them."""

    processes = 2

    @inlineCallbacks
    def test_each_notice_and_repeat_goes_out_once(self):
        for n in range(10):
            yield self.stores[n % 2].record(AlarmEvent(**{**FIRING, "fingerprint": f"f{n}"}))
        yield defer.gatherResults([n.tick() for n in self.notifiers])
        self.assertEqual(10, len(self.channel.told))
        self.assertEqual(10, len({group_id for _, group_id, _ in self.channel.told}))
        self.clock.advance(REPEAT)
        yield defer.gatherResults([n.tick() for n in self.notifiers])
        self.assertEqual(["repeat"] * 10, [r for _, _, r in self.channel.told[10:]])


class NoticeTextTests(TestCase):
    def test_a_notice_says_what_where_how_often_and_since_when(self):
        group = {"id": "ab" * 16, "service": "node!web1", "method": "HighLoad", "msg": "load is high",
                 "severity": "critical", "count": 3, "first_time": 0, "last_time": 60, "state": "firing"}
        self.assertEqual("🔥 Firing: HighLoad on node!web1\nload is high\nseverity: critical\n"
                         "3 times since 1970-01-01 00:00:00 UTC, last 1970-01-01 00:01:00 UTC\nid " + "ab" * 16,
                         notice_text("alarm", group, "opened"))


class ButtonTests(BotCase):
    """The notice in the chat (the local fake of the Bot API), its buttons, and what tapping them does."""

    def setUp(self):
        super().setUp()
        backend = backend_for(self.bus)
        self.store = backend.group_store(self.clock)
        self.silences = backend.silences(self.clock)
        self.bot.commands.groups = self.store
        self.bot.commands.silences = self.silences
        self.notifier = Notifier(self.store, [self.bot.notices], self.clock, silences=self.silences)

    @inlineCallbacks
    def noticed(self, event=None):
        yield self.store.record(event or AlarmEvent(**FIRING))
        yield self.notifier.tick()
        return self.fake.sent_to(OPS_CHAT)[-1]

    @inlineCallbacks
    def test_a_firing_alarms_notice_has_the_three_buttons_and_ack_shows_who_and_edits_it(self):
        sent = yield self.noticed()
        self.assertTrue(sent["visible"].startswith("🔥 Firing: HighLoad on node!web1"))
        buttons = [b for row in sent["reply_markup"]["inline_keyboard"] for b in row]
        self.assertEqual(["Ack", "Close", "Silence 1h"], [b["text"] for b in buttons])
        self.assertTrue(all(len(b["callback_data"].encode()) <= 64 for b in buttons))
        self.clock.advance(30)
        yield self.tap_button(sent["message"], buttons[0]["callback_data"])
        groups, _ = yield self.store.page("alarm", 10, None)
        self.assertEqual({"by": "@alice", "at": self.clock.seconds()}, groups[0]["acked"])
        [answer] = self.fake.answered
        self.assertIn("Acked by @alice", answer["text"])
        [edit] = self.fake.edited
        self.assertEqual((OPS_CHAT, sent["message_id"]), (int(edit["chat_id"]), int(edit["message_id"])))
        self.assertTrue(edit["visible"].endswith("Acked by @alice at 00:00 UTC"), edit["visible"])
        self.assertTrue(edit["visible"].startswith(sent["visible"]))

    @inlineCallbacks
    def test_close_from_the_chat_closes_the_group_and_takes_the_buttons_off(self):
        sent = yield self.noticed()
        yield self.tap_button(sent["message"], sent["reply_markup"]["inline_keyboard"][0][1]["callback_data"])
        groups, _ = yield self.store.page("alarm", 10, None)
        self.assertEqual("closed", groups[0]["state"])
        message = self.fake.messages[(OPS_CHAT, sent["message_id"])]
        self.assertNotIn("reply_markup", message)
        self.assertIn("Closed by @alice", message["text"])

    @inlineCallbacks
    def test_silence_1h_from_the_chat_silences_that_group_as_that_user(self):
        sent = yield self.noticed()
        yield self.tap_button(sent["message"], sent["reply_markup"]["inline_keyboard"][0][2]["callback_data"])
        [silence] = yield self.silences.list(self.clock.seconds())
        group_id = sent["reply_markup"]["inline_keyboard"][0][2]["callback_data"].rsplit(":", 1)[1]
        self.assertEqual(({"id": group_id}, "@alice", 3600.0, "active"),
                         (silence["matchers"], silence["created_by"], silence["ends"] - silence["starts"],
                          silence["state"]))
        self.assertIn("Silenced for 1 h by @alice", self.fake.messages[(OPS_CHAT, sent["message_id"])]["text"])
        yield self.store.record(AlarmEvent(**FIRING, status="resolved", epoch=2_000_000_000))
        yield self.notifier.tick()
        self.assertEqual(1, len(self.fake.sent_to(OPS_CHAT)))  # its resolve is held back too
        self.assertEqual(1, self.notifier.held)

    @inlineCallbacks
    def test_a_stranger_gets_the_refusal_and_nothing_changes(self):
        sent = yield self.noticed()
        yield self.tap_button(sent["message"], sent["reply_markup"]["inline_keyboard"][0][0]["callback_data"], BOB)
        [answer] = self.fake.answered
        self.assertEqual("Only the cockpit's allowed users can do that.", answer["text"])
        groups, _ = yield self.store.page("alarm", 10, None)
        self.assertIsNone(groups[0]["acked"])
        self.assertEqual([], self.fake.edited)

    @inlineCallbacks
    def test_a_button_of_a_group_that_is_gone_says_so(self):
        sent = yield self.noticed()
        yield self.tap_button(sent["message"], "g:a:a:" + "0" * 32)
        self.assertIn("gone", self.fake.answered[0]["text"])

    @inlineCallbacks
    def test_ecos_and_alarms_list_the_open_groups_with_their_buttons(self):
        yield self.store.record(EcoEvent(**ECO))
        yield self.store.record(AlarmEvent(**FIRING))
        yield self.say("/alarms")
        [listed] = [m for m in self.fake.sent_to(ALICE.id)]
        self.assertTrue(listed["visible"].startswith("🔥 Still firing: HighLoad on node!web1"))
        self.assertEqual(3, len(listed["reply_markup"]["inline_keyboard"][0]))
        yield self.say("/ecos")
        self.assertIn("order 12 lost", self.fake.sent_to(ALICE.id)[-1]["visible"])
        yield self.store.act("alarm", (yield self.store.page("alarm", 1, None))[0][0]["id"], "close", "x")
        yield self.say("/alarms")
        self.assertEqual("No alarm is firing.", self.fake.sent_to(ALICE.id)[-1]["visible"])

    def test_the_bot_hands_its_telegram_channel_to_the_notifier(self):
        self.assertIsInstance(self.bot, TelegramBot)
        self.assertEqual([OPS_CHAT], self.bot.notices.chats)


class MailNoticeTests(TestCase):
    """Notices by mail to [notify] mail_to, through a MailSender to the local relay the mail tests use."""

    timeout = 20

    @inlineCallbacks
    def test_a_notice_arrives_by_mail_through_the_relay(self):
        from email import message_from_bytes, policy
        from pathlib import Path

        from cockpit.backends.embedded.outbox import SpoolOutbox
        from cockpit.config import RelaySection
        from cockpit.notices import MailChannel
        from cockpit.smtp import MailSender
        from tests.test_mail_send import ClockedReactor, RelaySink
        from tests.test_smtp import self_signed_cert

        cert = self_signed_cert(Path(self.mktemp()), host="localhost")
        sink = RelaySink(cert)
        listening = reactor.listenTCP(0, sink.factory(), interface="127.0.0.1")
        self.addCleanup(lambda: [p.transport.abortConnection() for p in sink.protocols
                                 if p.transport is not None and not p.transport.disconnected])
        self.addCleanup(listening.stopListening)
        clock = Clock()
        clock.advance(1_800_000_000)
        relay = RelaySection(host="localhost", port=listening.getHost().port, username="cockpit", password="relaypw",
                             starttls=True, sender="cockpit@cockpit.test", ca_cert=str(cert), timeout=10.0)
        mailer = MailSender(relay, ClockedReactor(clock), hostname="cockpit.test",
                            outbox=SpoolOutbox(None, ClockedReactor(clock)))
        mailer.startService()
        self.addCleanup(mailer.stopService)
        bus = MemoryBus(clock=clock)
        store = backend_for(bus).group_store(clock)
        notifier = Notifier(store, [MailChannel(mailer, ["oncall@example.org"])], clock)
        yield store.record(AlarmEvent(**FIRING, epoch=1_800_000_000))
        arrived = sink.wait()
        yield notifier.tick()
        yield arrived
        [record] = yield mailer.deliveries(1)
        outcome = yield mailer.next_outcome(record["id"])  # the relay's session is over
        self.assertEqual("sent", outcome["state"])
        [(recipient, raw)] = sink.messages
        message = message_from_bytes(raw, policy=policy.default)
        self.assertEqual(("oncall@example.org", "[cockpit] 🔥 Firing: HighLoad on node!web1"),
                         (recipient, message["Subject"]))
        self.assertIn("load is high\nseverity: critical\n1 time since 2027-01-15", message.get_content())
        self.assertEqual(1, notifier.sent)


class EndToEndTests(TestCase):
    """A real ``twistd`` cockpit on Redis, the local fake of the Bot API, and the REST API."""

    timeout = 60

    @inlineCallbacks
    def start(self, cockpits: int = 1):
        from tests.cockpits import spawn_cockpit
        from tests.fake_telegram import FakeTelegram, FakeTelegramServer
        from tests.test_telegram_api import TOKEN

        redis = shared_server()
        redis.flush()
        fake = FakeTelegram(TOKEN, clock=reactor)
        telegram = FakeTelegramServer(fake).start()
        self.addCleanup(telegram.stop)
        extra = (f'[redis]\nurl = "{redis.url}"\n[bot]\ntoken = "{TOKEN}"\napi_url = "{telegram.url}"\n'
                 f'allowed_users = [{ALICE.id}]\nnotify_chats = [{OPS_CHAT}]\n')
        started = yield defer.gatherResults([spawn_cockpit(self, extra=extra).started() for _ in range(cockpits)])
        return (started[0] if cockpits == 1 else started), fake

    @inlineCallbacks
    def test_two_cockpits_send_each_notice_once(self):
        from tests.cockpits import call, eventually

        cockpits, fake = yield self.start(2)
        for n in range(10):
            code, _ = yield call("POST", f"{cockpits[n % 2].api}/events/alarm", {**FIRING, "fingerprint": f"f{n}"})
            self.assertEqual(202, code)
        yield fake.wait_for("sendMessage", 10)

        @inlineCallbacks
        def looks():
            seen = []
            for cockpit in cockpits:
                _, health = yield call("GET", f"{cockpit.api}/health")
                seen.append(health["services"]["notices"]["looks"])
            return seen

        first = yield looks()

        @inlineCallbacks
        def both_looked_twice_more():
            # each notifier has looked at what is due twice since: nothing more was left to send
            now = yield looks()
            return all(n >= f + 2 for n, f in zip(now, first))

        yield eventually(both_looked_twice_more, timeout=20, what="two more looks by each notifier")
        sent = fake.sent_to(OPS_CHAT)
        self.assertEqual(10, len(sent))
        self.assertEqual(10, len({m["reply_markup"]["inline_keyboard"][0][0]["callback_data"] for m in sent}))

    @inlineCallbacks
    def test_under_a_two_second_silence_an_alarm_gets_one_notice_once_the_silence_ends(self):
        from tests.cockpits import call

        cockpit, fake = yield self.start()
        code, silence = yield call("POST", f"{cockpit.api}/silences",
                                   {"matchers": {"service": "node!*"}, "duration": 2, "created_by": "ops"})
        self.assertEqual(201, code)
        for _ in range(3):
            code, _ = yield call("POST", f"{cockpit.api}/events/alarm", FIRING)
            self.assertEqual(202, code)
        yield fake.wait_for("sendMessage", 1)
        [notice] = fake.sent_to(OPS_CHAT)
        self.assertGreaterEqual(notice["message"]["date"], int(silence["ends"]))  # not before its end
        self.assertTrue(notice["visible"].startswith("🔥 Firing (its silence ended): HighLoad"), notice["visible"])
        code, page = yield call("GET", f"{cockpit.api}/alarms")
        self.assertEqual((200, 3), (code, page["alarms"][0]["count"]))

    @inlineCallbacks
    def test_an_alarm_posted_over_rest_is_noticed_and_acked_from_the_chat(self):
        from tests.cockpits import call, eventually

        cockpit, fake = yield self.start()
        code, _ = yield call("POST", f"{cockpit.api}/events/alarm", FIRING)
        self.assertEqual(202, code)
        for n in range(20):  # repeats: no further notice
            yield call("POST", f"{cockpit.api}/events/alarm", FIRING)
        yield fake.wait_for("sendMessage", 1)
        [notice] = fake.sent_to(OPS_CHAT)
        ack = notice["reply_markup"]["inline_keyboard"][0][0]
        self.assertEqual("Ack", ack["text"])
        fake.callback(ALICE, notice["message"], ack["callback_data"])
        yield fake.wait_for("editMessageText", 1)
        group_id = ack["callback_data"].rsplit(":", 1)[1]

        @inlineCallbacks
        def counted():
            code, group = yield call("GET", f"{cockpit.api}/alarms/{group_id}")
            return group if code == 200 and group["count"] == 21 else None

        group = yield eventually(counted, timeout=20, what="the 21 alarms counted")
        self.assertEqual(("@alice", "firing"), (group["acked"]["by"], group["state"]))
        self.assertIn("Acked by @alice", fake.messages[(OPS_CHAT, notice["message_id"])]["text"])
        self.assertEqual(1, len(fake.sent_to(OPS_CHAT)))
