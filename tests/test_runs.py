"""Run history in SQLite."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from twisted.internet import defer
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit.runs import Run, RunHistory, new_run_id


def event_run(guid: str, action: str = "notify", state: str = "ok", ended: float = 100.0) -> Run:
    return Run("demo", "node!web1", action, {"kind": "event", "event_type": "email", "event_guid": guid},
               state=state, started=ended - 1, ended=ended, log="subject: hello\n", result={"n": 1})


class RunHistoryTests(TestCase):
    def setUp(self):
        self.path = Path(self.mktemp()) / "runs.sqlite"
        self.history = RunHistory(self.path, keep_days=1, keep_runs=3, clock=Clock())
        self.history.startService()
        self.addCleanup(self.history.stopService)

    @inlineCallbacks
    def test_recorded_run_reads_back_with_every_field(self):
        run = event_run("g1")
        self.assertTrue((yield self.history.record(run)))
        got = yield self.history.get(run.id)
        self.assertEqual(got.to_dict(), run.to_dict())
        self.assertIsNone((yield self.history.get("nope")))

    @inlineCallbacks
    def test_same_event_run_is_recorded_once(self):
        first, again = event_run("g1"), event_run("g1")
        results = yield defer.gatherResults([self.history.record(first), self.history.record(again)])
        self.assertEqual(results, [True, False])
        self.assertEqual((yield self.history.count(event_guid="g1")), 1)
        self.assertEqual((yield self.history.completed("g1")), {("demo", "node!web1", "notify")})

    @inlineCallbacks
    def test_runs_without_an_event_are_never_deduplicated(self):
        runs = [Run("demo", "node!web1", "install", {"kind": "rest"}, state="ok") for _ in range(2)]
        self.assertEqual((yield defer.gatherResults([self.history.record(r) for r in runs])), [True, True])

    @inlineCallbacks
    def test_many_runs_recorded_at_once_share_transactions(self):
        results = yield defer.gatherResults([self.history.record(event_run(f"g{i}")) for i in range(300)])
        self.assertEqual(results, [True] * 300)
        self.assertEqual((yield self.history.count()), 300)

    @inlineCallbacks
    def test_list_filters_and_pages_newest_first(self):
        runs = [event_run("a"), event_run("b", state="error"), event_run("c", action="escalate")]
        for run in runs:
            yield self.history.record(run)
        listed = yield self.history.list()
        self.assertEqual([r.id for r in listed], [r.id for r in reversed(runs)])
        self.assertEqual([r.id for r in (yield self.history.list(state="error"))], [runs[1].id])
        self.assertEqual([r.id for r in (yield self.history.list(action="escalate"))], [runs[2].id])
        self.assertEqual([r.id for r in (yield self.history.list(event_guid="a"))], [runs[0].id])
        self.assertEqual([r.id for r in (yield self.history.list(limit=1, before=runs[2].id))], [runs[1].id])

    @inlineCallbacks
    def test_prune_drops_old_runs_and_keeps_the_newest_count(self):
        for i in range(5):
            yield self.history.record(event_run(f"g{i}", ended=1000.0 + i))
        removed = yield self.history.prune(now=1000.0 + 86400 + 0.5)  # g0 is older than a day
        self.assertEqual(removed, 2)  # g0 by age, g1 by count (3 kept)
        self.assertEqual(sorted(r.event_guid for r in (yield self.history.list())), ["g2", "g3", "g4"])

    @inlineCallbacks
    def test_history_survives_a_restart(self):
        run = event_run("g1", ended=time.time())  # a start prunes: an old run would go
        yield self.history.record(run)
        yield self.history.stopService()
        self.history.startService()
        self.assertEqual((yield self.history.get(run.id)).state, "ok")
        with sqlite3.connect(self.path) as connection:
            self.assertEqual(connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0], 1)

    def test_run_ids_sort_by_creation(self):
        ids = [new_run_id() for _ in range(100)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 100)
