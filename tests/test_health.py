"""/api/health is degraded when the store, the run history or a Telegram bot stuck in backoff cannot work."""
from __future__ import annotations

import os
import sqlite3
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.embedded.runs import SqliteRunHistory
from cockpit.health import STUCK_AFTER, run_history_health, store_health, telegram_health
from cockpit.store import Store
from cockpit.web import Api
from tests.test_telegram import ALICE, BotCase


@inlineCallbacks
def health_of(**services: Any) -> Any:
    """``(status code, body)`` of /api/health on an Api reporting ``services``."""
    api = Api(config.from_dict({}), MemoryBus(clock=Clock()), clock=Clock(), services=services)
    response = yield StubTreq(api.app.resource()).get("http://cockpit/api/health")
    return response.code, (yield response.json())


class StoreHealthTests(TestCase):
    @inlineCallbacks
    def test_a_store_not_made_yet_under_a_writable_directory_is_ok(self):
        store = Store(Path(self.mktemp()).absolute() / "store", "http://cockpit", reactor)
        code, body = yield health_of(store=partial(store_health, store))
        self.assertEqual((200, "ok", True), (code, body["status"], body["services"]["store"]["ok"]))

    @inlineCallbacks
    def test_a_store_under_a_regular_file_makes_health_degraded(self):
        handle = tempfile.NamedTemporaryFile(dir=".", delete=False)
        handle.close()
        self.addCleanup(os.unlink, handle.name)
        store = Store(Path(handle.name).absolute() / "store", "http://cockpit", reactor)
        code, body = yield health_of(store=partial(store_health, store))
        self.assertEqual((503, "degraded", False), (code, body["status"], body["services"]["store"]["ok"]))
        self.assertEqual(f"{Path(handle.name).absolute()} is not a directory", body["services"]["store"]["error"])


class RunHistoryHealthTests(TestCase):
    @inlineCallbacks
    def test_a_run_history_that_runs_is_ok_and_a_stopped_one_degraded(self):
        history = SqliteRunHistory(Path(self.mktemp()).absolute() / "runs.sqlite", Clock())
        history.startService()
        yield history.count()  # opened
        code, body = yield health_of(run_history=partial(run_history_health, history))
        self.assertEqual((200, True), (code, body["services"]["run_history"]["ok"]))
        yield history.stopService()
        code, body = yield health_of(run_history=partial(run_history_health, history))
        self.assertEqual((503, "degraded", False), (code, body["status"], body["services"]["run_history"]["ok"]))

    @inlineCallbacks
    def test_a_run_history_whose_database_cannot_be_opened_makes_health_degraded(self):
        where = Path(self.mktemp()).absolute()
        (where / "runs.sqlite").mkdir(parents=True)  # a directory where the database should be
        history = SqliteRunHistory(where / "runs.sqlite", Clock())
        history.startService()
        self.addCleanup(history.stopService)
        yield self.assertFailure(history.count(), sqlite3.OperationalError)
        self.assertEqual(1, len(self.flushLoggedErrors(sqlite3.OperationalError)))  # logged as it failed
        code, body = yield health_of(run_history=partial(run_history_health, history))
        report = body["services"]["run_history"]
        self.assertEqual((503, False, True), (code, report["ok"], report["running"]))
        self.assertTrue(report["error"].startswith("cannot be opened: "), report)


class TelegramHealthTests(BotCase):
    start_bot = False

    @inlineCallbacks
    def test_a_bot_stuck_in_backoff_is_not_ok_until_telegram_answers_again(self):
        self.fake.fail_next("getUpdates", 500, times=STUCK_AFTER)
        waiting = self.bot.poller.next_wait()
        self.bot.startService()
        self.addCleanup(self.bot.stopService)
        seen = []
        for _ in range(STUCK_AFTER):
            _, seconds = yield waiting
            code, body = yield health_of(telegram=partial(telegram_health, self.bot))
            seen.append((code, body["services"]["telegram"]["ok"]))
            waiting = self.bot.poller.next_wait()
            self.clock.advance(seconds)
        self.assertEqual([(200, True)] * (STUCK_AFTER - 1) + [(503, False)], seen)
        self.fake.message(ALICE, "/help")
        yield self.bot.poller.when_handled(1)
        code, body = yield health_of(telegram=partial(telegram_health, self.bot))
        self.assertEqual((200, True, 0), (code, body["services"]["telegram"]["ok"],
                                          body["services"]["telegram"]["failures_in_a_row"]))
