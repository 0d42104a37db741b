"""The Bot API client against the fake Bot API, and the fake's own Telegram rules."""
from __future__ import annotations

import json

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cockpit.telegram_api import (ApiUnreachable, BadRequest, BadToken, BotApi, Conflict, RetryAfter,
                                  bot_id)
from tests.fake_telegram import CONFLICT, FakeTelegram, FakeTelegramServer, User, visible_text

TOKEN = "123456:TEST-secret-token"
ALICE = User(1001, "alice", "Alice")


def real_client(testcase: TestCase, url: str, clock, token: str = TOKEN, **options) -> BotApi:
    """A BotApi over a real treq client with its own pool, closed when the test ends."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.retryAutomatically = False
    api = BotApi(token, url, HTTPClient(Agent(reactor, pool=pool)), clock, pool=pool, **options)
    testcase.addCleanup(api.close)
    return api


class ServedFake:
    """setUp/cleanup for a fake on a real port with its own Clock."""

    def serve(self, token: str = TOKEN):
        self.clock = Clock()
        self.fake = FakeTelegram(TOKEN, clock=self.clock)
        self.server = FakeTelegramServer(self.fake).start()
        self.addCleanup(self.server.stop)
        self.api = real_client(self, self.server.url, self.clock, token)


class BotApiTests(ServedFake, TestCase):
    def setUp(self):
        self.serve()

    @inlineCallbacks
    def test_get_updates_answers_at_once_when_updates_are_waiting(self):
        self.fake.message(ALICE, "/help")
        updates = yield self.api.get_updates(None)
        self.assertEqual([u["message"]["text"] for u in updates], ["/help"])
        method, params = self.fake.calls[-1]
        self.assertEqual((method, params["timeout"], params["allowed_updates"]),
                         ("getUpdates", 30, ["message", "callback_query"]))

    @inlineCallbacks
    def test_long_poll_is_answered_when_an_update_arrives(self):
        d = self.api.get_updates(None)
        yield self.fake.wait_for("getUpdates", 1)
        self.assertTrue(self.fake.polling)
        self.assertNoResult(d)
        self.fake.message(ALICE, "/start")
        updates = yield d
        self.assertEqual(updates[0]["message"]["text"], "/start")

    @inlineCallbacks
    def test_long_poll_ends_empty_after_its_timeout(self):
        d = self.api.get_updates(None, timeout=30)
        yield self.fake.wait_for("getUpdates", 1)
        self.clock.advance(29)
        self.assertTrue(self.fake.polling)
        self.clock.advance(1)
        self.assertEqual((yield d), [])

    @inlineCallbacks
    def test_offset_confirms_earlier_updates(self):
        first = self.fake.message(ALICE, "one")
        second = self.fake.message(ALICE, "two")
        self.assertEqual(len((yield self.api.get_updates(None, timeout=0))), 2)
        again = yield self.api.get_updates(first["update_id"] + 1, timeout=0)
        self.assertEqual([u["update_id"] for u in again], [second["update_id"]])
        # confirmed for good: asking without an offset no longer returns the first
        self.assertEqual([u["update_id"] for u in (yield self.api.get_updates(None, timeout=0))],
                         [second["update_id"]])

    @inlineCallbacks
    def test_negative_offset_keeps_only_the_last_updates(self):
        for n in range(5):
            self.fake.message(ALICE, f"m{n}")
        updates = yield self.api.get_updates(-2, timeout=0)
        self.assertEqual([u["message"]["text"] for u in updates], ["m3", "m4"])
        self.assertEqual(len(self.fake.updates), 2)

    @inlineCallbacks
    def test_allowed_updates_filter_out_other_kinds(self):
        self.fake.add_update({"edited_message": {"message_id": 1, "text": "x"}})
        self.fake.message(ALICE, "/help")
        updates = yield self.api.get_updates(None, timeout=0)
        self.assertEqual([list(u)[1] for u in updates], ["message"])

    @inlineCallbacks
    def test_wrong_token_is_bad_token_and_the_token_is_never_shown(self):
        api = real_client(self, self.server.url, self.clock, token="123456:WRONG-token")
        error = yield self.assertFailure(api.call("getMe"), BadToken)
        self.assertEqual(error.error_code, 401)
        self.assertNotIn("WRONG-token", str(error))
        self.assertNotIn("WRONG-token", repr(api))

    @inlineCallbacks
    def test_a_second_poll_ends_the_first_with_409_conflict(self):
        first = self.api.get_updates(None)
        yield self.fake.wait_for("getUpdates", 1)
        other = real_client(self, self.server.url, self.clock)
        second = other.get_updates(None)
        error = yield self.assertFailure(first, Conflict)
        self.assertEqual(error.description, CONFLICT)
        self.fake.message(ALICE, "hello")
        self.assertEqual(len((yield second)), 1)

    @inlineCallbacks
    def test_429_carries_retry_after(self):
        self.fake.fail_next("getUpdates", 429, retry_after=7)
        error = yield self.assertFailure(self.api.get_updates(None), RetryAfter)
        self.assertEqual(error.retry_after, 7)

    @inlineCallbacks
    def test_gateway_page_is_unreachable_not_a_crash(self):
        self.fake.fail_next("getMe", 502, gateway_page=True)
        error = yield self.assertFailure(self.api.call("getMe"), ApiUnreachable)
        self.assertIn("502", str(error))

    @inlineCallbacks
    def test_message_over_4096_characters_is_refused_as_too_long(self):
        error = yield self.assertFailure(self.api.send_message(ALICE.id, "x" * 4097), BadRequest)
        self.assertEqual(error.description, "Bad Request: message is too long")
        yield self.api.send_message(ALICE.id, "x" * 4096)
        self.assertEqual(len(self.fake.sent), 1)

    @inlineCallbacks
    def test_unescaped_html_is_refused_like_telegram_does(self):
        error = yield self.assertFailure(self.api.send_message(ALICE.id, "a <b"), BadRequest)
        self.assertIn("can't parse entities", error.description)
        yield self.api.send_message(ALICE.id, "a &lt;b &amp; c")
        self.assertEqual(self.fake.sent[-1]["visible"], "a <b & c")

    @inlineCallbacks
    def test_network_failure_is_unreachable_and_names_no_url(self):
        yield self.server.stop()
        self.addCleanup(self.server.start)  # so that the cleanup's stop() finds it listening
        error = yield self.assertFailure(self.api.call("getMe"), ApiUnreachable)
        self.assertIn("network failure", str(error))
        self.assertNotIn(TOKEN, str(error))

    @inlineCallbacks
    def test_reply_over_max_reply_bytes_is_cut_off(self):
        api = real_client(self, self.server.url, self.clock, max_reply=1000)
        self.fake.message(ALICE, "y" * 2000)
        error = yield self.assertFailure(api.get_updates(None, timeout=0), ApiUnreachable)
        self.assertIn("over 1000 bytes", str(error))

    @inlineCallbacks
    def test_call_that_hangs_times_out_on_the_clock(self):
        d = self.api.get_updates(None, timeout=30)
        yield self.fake.wait_for("getUpdates", 1)
        self.fake.clock = Clock()  # the fake's own timer will not end the poll now
        self.clock.advance(30 + self.api.call_timeout)
        error = yield self.assertFailure(d, ApiUnreachable)
        self.assertIn("no complete answer", str(error))

    @inlineCallbacks
    def test_cancelling_a_poll_releases_the_fake(self):
        d = self.api.get_updates(None)
        yield self.fake.wait_for("getUpdates", 1)
        d.cancel()
        self.failureResultOf(d)
        yield self.server.factory.when_idle()
        self.assertFalse(self.fake.polling)

    @inlineCallbacks
    def test_file_is_downloaded_through_get_file(self):
        update = self.fake.document(ALICE, "nodes.yaml", b"node__n1: {}\n")
        file_id = update["message"]["document"]["file_id"]
        self.assertEqual((yield self.api.download(file_id, 1024)), b"node__n1: {}\n")
        yield self.assertFailure(self.api.download(file_id, 5), BadRequest)
        yield self.assertFailure(self.api.download("nonsense", 1024), BadRequest)

    @inlineCallbacks
    def test_callback_query_is_answered_and_keyboard_removed(self):
        keyboard = {"inline_keyboard": [[{"text": "List", "callback_data": "/repo list"}]]}
        sent = yield self.api.send_message(ALICE.id, "pick", reply_markup=keyboard)
        self.fake.callback(ALICE, sent, "/repo list")
        query = (yield self.api.get_updates(None, timeout=0))[0]["callback_query"]
        yield self.api.answer_callback_query(query["id"])
        yield self.api.remove_keyboard(ALICE.id, sent["message_id"])
        self.assertEqual(len(self.fake.answered), 1)
        self.assertNotIn("reply_markup", self.fake.messages[(ALICE.id, sent["message_id"])])
        # a second answer is refused, as Telegram refuses it
        yield self.assertFailure(self.api.answer_callback_query(query["id"]), BadRequest)


class StubTreqTests(TestCase):
    """The same client over treq.testing.StubTreq: no port at all."""

    def test_send_message_through_stub_treq(self):
        fake = FakeTelegram(TOKEN, clock=Clock())
        api = BotApi(TOKEN, "http://api.telegram.test", StubTreq(fake), Clock())
        d = api.send_message(42, "hello &amp; bye")
        self.assertEqual(self.successResultOf(d)["text"], "hello & bye")
        self.assertEqual(fake.sent[0]["chat_id"], 42)


class PureTests(TestCase):
    def test_bot_id_is_the_public_part_of_the_token(self):
        self.assertEqual(bot_id(TOKEN), "123456")

    def test_visible_text_unescapes_and_strips_known_tags(self):
        self.assertEqual(visible_text("<b>a</b> &lt; &amp; _"), "a < & _")

    def test_fake_errors_use_the_bot_api_envelope(self):
        fake = FakeTelegram(TOKEN, clock=Clock())
        api = BotApi("1:bad", "http://t.test", StubTreq(fake), Clock())
        failure = self.failureResultOf(api.call("getMe"), BadToken)
        self.assertEqual(failure.value.description, "Unauthorized")

    def test_the_token_never_reaches_the_log(self):
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        fake = FakeTelegram(TOKEN, clock=Clock())
        fake.fail_next("getMe", 500)
        api = BotApi(TOKEN, "http://t.test", StubTreq(fake), Clock())
        self.failureResultOf(api.call("getMe"), ApiUnreachable)
        self.assertNotIn(TOKEN, json.dumps([str(e) for e in seen]))
