"""The run history: one behaviour suite against SQLite and against Redis, then what sharing Redis adds."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.internet import defer
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit.backends.embedded.runs import SqliteRunHistory
from cockpit.backends.redis.runs import LIVE_RENEW, LIVE_TTL, RETRY_FIRST, RedisRunHistory
from cockpit.runs import Run, new_run_id
from tests.redis_server import RedisServer, shared_server, started_bus

T0 = 1_700_000_000.0  # the clocks' start: runs are made at known times on them
DAY = 86400.0
NEVER = 1000 * DAY  # a prune interval: only the test prunes


def run_at(when: float, guid: str | None = "g1", repo: str = "demo", service: str | None = "node!web1",
           action: str = "notify", state: str = "ok", kind: str = "event") -> Run:
    return Run(repo, service, action, {"kind": kind, "event_type": "email" if guid else None, "event_guid": guid},
               id=new_run_id(when), state=state, started=when, ended=when + 0.5, log="subject: hello\n",
               result={"n": 1, "text": "ünïcode"})


def ids(runs) -> list[str]:
    return [run.id for run in runs]


def shown(history, run) -> defer.Deferred:
    """``history.started(run)``, and the history's clock past the moment a run still going is shown."""
    from cockpit.backends.redis.runs import LIVE_AFTER

    d = history.started(run)
    history.clock.advance(LIVE_AFTER)
    return d


class HistoryBehaviour:
    """What every run history does; a subclass says how to make one and how to wait for its timers' work."""

    timeout = 20
    keep_days = 1.0

    def make_history(self, clock: Clock, keep_runs: int = 1000, prune_interval: float = NEVER):
        raise NotImplementedError

    def settle(self, history) -> defer.Deferred:
        """Fires once what the history's timers started is done."""
        raise NotImplementedError

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.history = self.make_history(self.clock)

    def start(self, history):
        history.startService()
        self.addCleanup(history.stopService)
        return history

    @inlineCallbacks
    def record_all(self, runs):
        results = []
        for run in runs:
            results.append((yield self.history.record(run)))
        return results

    @inlineCallbacks
    def test_recorded_run_reads_back_with_every_field(self):
        run = run_at(T0)
        self.assertTrue((yield self.history.record(run)))
        got = yield self.history.get(run.id)
        self.assertEqual(got.to_dict(), run.to_dict())
        self.assertIsNone((yield self.history.get("nope")))

    @inlineCallbacks
    def test_second_run_of_one_event_action_is_refused(self):
        first, again = run_at(T0), run_at(T0 + 1)
        results = yield defer.gatherResults([self.history.record(first), self.history.record(again)])
        self.assertEqual(results, [True, False])
        self.assertEqual((yield self.history.count(event_guid="g1")), 1)
        self.assertEqual((yield self.history.completed("g1")), {("demo", "node!web1", "notify")})
        self.assertEqual(ids((yield self.history.list())), [first.id])
        self.assertIsNone((yield self.history.get(again.id)))

    @inlineCallbacks
    def test_same_run_recorded_twice_is_refused_the_second_time(self):
        run = run_at(T0, guid=None, kind="rest")
        self.assertEqual((yield self.record_all([run, run])), [True, False])
        self.assertEqual((yield self.history.count()), 1)

    @inlineCallbacks
    def test_other_actions_of_the_same_event_are_each_recorded(self):
        runs = [run_at(T0, action="notify"), run_at(T0 + 1, action="escalate"),
                run_at(T0 + 2, service="node!web2"), run_at(T0 + 3, repo="other")]
        self.assertEqual((yield self.record_all(runs)), [True] * 4)
        self.assertEqual((yield self.history.completed("g1")),
                         {("demo", "node!web1", "notify"), ("demo", "node!web1", "escalate"),
                          ("demo", "node!web2", "notify"), ("other", "node!web1", "notify")})
        self.assertEqual((yield self.history.completed("never")), set())

    @inlineCallbacks
    def test_runs_without_an_event_are_never_deduplicated(self):
        runs = [run_at(T0, guid=None, action="install", kind="rest") for _ in range(2)]
        self.assertEqual((yield defer.gatherResults([self.history.record(r) for r in runs])), [True, True])

    @inlineCallbacks
    def test_robot_own_run_is_completed_with_an_empty_service(self):
        run = run_at(T0, guid="chat1", repo="env du-conv2", service=None, action="repo.create", kind="telegram")
        self.assertTrue((yield self.history.record(run)))
        self.assertEqual((yield self.history.completed("chat1")), {("env du-conv2", "", "repo.create")})
        self.assertIsNone((yield self.history.get(run.id)).service)
        self.assertEqual(ids((yield self.history.list(service=""))), [run.id])
        self.assertFalse((yield self.history.record(run_at(T0 + 1, guid="chat1", repo="env du-conv2",
                                                            service=None, action="repo.create"))))

    @inlineCallbacks
    def test_many_runs_recorded_at_once_are_all_written(self):
        results = yield defer.gatherResults([self.history.record(run_at(T0 + i, guid=f"g{i}"))
                                             for i in range(300)])
        self.assertEqual(results, [True] * 300)
        self.assertEqual((yield self.history.count()), 300)

    @inlineCallbacks
    def test_list_is_newest_first_and_each_filter_narrows_it(self):
        a = run_at(T0, guid="a")
        b = run_at(T0 + 1, guid="b", state="error")
        c = run_at(T0 + 2, guid="c", action="escalate")
        d = run_at(T0 + 3, guid="a", repo="other", service="db!main", state="timeout")
        e = run_at(T0 + 4, guid=None, service="db!main", action="install", kind="rest")
        yield self.record_all([a, b, c, d, e])
        cases = {
            (): [e, d, c, b, a],
            (("repo", "demo"),): [e, c, b, a],
            (("repo", "other"),): [d],
            (("service", "db!main"),): [e, d],
            (("action", "escalate"),): [c],
            (("state", "error"),): [b],
            (("state", "ok"),): [e, c, a],
            (("event_guid", "a"),): [d, a],
            (("repo", "demo"), ("service", "db!main")): [e],
            (("repo", "demo"), ("state", "ok"), ("action", "notify")): [a],
            (("event_guid", "a"), ("repo", "demo")): [a],
            (("event_guid", "a"), ("state", "error")): [],
            (("repo", "nowhere"),): [],
            (("repo", "other"), ("state", "ok")): [],
        }
        for filters, expected in cases.items():
            listed = yield self.history.list(**dict(filters))
            self.assertEqual(ids(listed), ids(expected), filters)
            self.assertEqual((yield self.history.count(**dict(filters))), len(expected), filters)

    @inlineCallbacks
    def test_list_pages_by_before_with_and_without_filters(self):
        runs = [run_at(T0 + i, guid=f"g{i}", state="error" if i % 3 == 0 else "ok") for i in range(10)]
        yield self.record_all(runs)
        newest_first = list(reversed(runs))
        pages, before = [], None
        while True:
            page = yield self.history.list(limit=4, before=before)
            pages.append(ids(page))
            if len(page) < 4:
                break
            before = page[-1].id
        self.assertEqual(pages, [ids(newest_first[0:4]), ids(newest_first[4:8]),
                                 ids(newest_first[8:])])
        errors = [r for r in newest_first if r.state == "error"]  # 9, 6, 3, 0
        page = yield self.history.list(limit=2, state="error")
        self.assertEqual(ids(page), ids(errors[:2]))
        page = yield self.history.list(limit=2, before=page[-1].id, state="error")
        self.assertEqual(ids(page), ids(errors[2:]))
        self.assertEqual((yield self.history.list(before=runs[0].id)), [])
        self.assertEqual(ids((yield self.history.list(limit=1, before=runs[5].id, event_guid="g3"))),
                         [runs[3].id])

    def test_unknown_filter_is_refused(self):
        self.failureResultOf(self.history.list(colour="red"), ValueError)
        self.failureResultOf(self.history.count(colour="red"), ValueError)

    @inlineCallbacks
    def test_prune_drops_runs_older_than_keep_days_on_the_history_clock(self):
        old, new = run_at(T0, guid="old"), run_at(T0 + DAY / 2, guid="new")
        yield self.record_all([old, new])
        self.clock.advance(DAY + 1)  # old is a day and a second old, new half a day
        self.assertEqual((yield self.history.prune()), 1)
        self.assertEqual(ids((yield self.history.list())), [new.id])
        self.assertEqual((yield self.history.completed("old")), set())
        self.assertEqual((yield self.history.count(event_guid="old")), 0)
        self.assertEqual((yield self.history.count(repo="demo")), 1)

    @inlineCallbacks
    def test_prune_timer_prunes_on_the_history_clock(self):
        history = self.start(self.make_history(self.clock, prune_interval=3600.0))
        old, new = run_at(T0 - DAY - 1, guid="old"), run_at(T0, guid="new")
        yield history.record(old)
        yield history.record(new)
        self.clock.advance(3600)
        yield self.settle(history)
        self.assertEqual(ids((yield history.list())), [new.id])

    @inlineCallbacks
    def test_prune_keeps_the_newest_keep_runs(self):
        history = self.start(self.make_history(self.clock, keep_runs=3))
        runs = [run_at(T0 + i, guid=f"g{i}") for i in range(5)]
        for run in runs:
            yield history.record(run)
        yield history.prune()
        self.assertEqual(ids((yield history.list())), ids(reversed(runs[2:])))
        self.assertEqual((yield history.count()), 3)
        self.assertEqual((yield history.completed("g0")), set())

    @inlineCallbacks
    def test_an_event_whose_run_was_pruned_can_complete_again(self):
        yield self.history.record(run_at(T0))
        self.clock.advance(2 * DAY)
        yield self.history.prune()
        self.assertTrue((yield self.history.record(run_at(T0 + 2 * DAY))))

    @inlineCallbacks
    def test_started_run_is_replaced_by_its_record(self):
        run = run_at(T0)
        run.state, run.ended, run.log, run.result = "running", None, "", None
        self.assertIsNone((yield shown(self.history, run)))
        run.state, run.ended, run.log = "ok", T0 + 1, "done\n"
        self.assertTrue((yield self.history.record(run)))
        self.assertEqual([(r.id, r.state) for r in (yield self.history.list())], [(run.id, "ok")])
        self.assertEqual((yield self.history.get(run.id)).log, "done\n")
        self.assertEqual((yield self.history.list(state="running")), [])

    @inlineCallbacks
    def test_history_survives_a_restart(self):
        run = run_at(T0)
        yield self.history.record(run)
        yield self.history.stopService()
        self.history.startService()
        self.assertEqual((yield self.history.get(run.id)).state, "ok")


class SqliteHistoryTests(HistoryBehaviour, TestCase):
    def make_history(self, clock, keep_runs=1000, prune_interval=NEVER):
        history = SqliteRunHistory(Path(self.mktemp()) / "runs.sqlite", clock, keep_days=self.keep_days,
                                   keep_runs=keep_runs, prune_interval=prune_interval)
        return history

    def setUp(self):
        super().setUp()
        self.start(self.history)

    def settle(self, history):
        return history.count()  # one connection: this query runs after the prune the timer started

    @inlineCallbacks
    def test_a_run_recorded_after_the_history_stopped_fails_instead_of_waiting_for_ever(self):
        history = self.make_history(self.clock)
        history.startService()
        yield history.stopService()
        failure = yield self.assertFailure(history.record(run_at(T0)), RuntimeError)
        self.assertIn("not running", str(failure))

    @inlineCallbacks
    def test_runs_are_kept_in_the_data_dir_file(self):
        yield self.history.record(run_at(T0))
        with sqlite3.connect(self.history.path) as connection:
            self.assertEqual(connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0], 1)


class RedisCase(TestCase):
    """Histories of two processes on one Redis: each its own connection and clock."""

    timeout = 20
    keep_days = 1.0

    @inlineCallbacks
    def connected_bus(self, url: str):
        bus = yield started_bus(self, url=url, timeout=2.0)
        return bus

    @inlineCallbacks
    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()
        self.bus = yield self.connected_bus(self.redis.url)
        self.clock = Clock()
        self.clock.advance(T0)
        self.history = self.make_history(self.clock)
        self.start(self.history)

    def make_history(self, clock, keep_runs=1000, prune_interval=NEVER, bus=None):
        return RedisRunHistory(bus or self.bus, clock, keep_days=self.keep_days, keep_runs=keep_runs,
                               prune_interval=prune_interval)

    def start(self, history):
        history.startService()
        self.addCleanup(history.stopService)
        return history

    def settle(self, history):
        return history.bus.execute("PING")  # one connection: its answer comes after what was sent before

    @inlineCallbacks
    def other_process(self):
        """A second history, on a connection and a clock of its own, at the same time."""
        bus = yield self.connected_bus(self.redis.url)
        clock = Clock()
        clock.advance(self.clock.seconds())
        return self.start(self.make_history(clock, bus=bus)), clock

    def keys(self) -> list[str]:
        return sorted(self.redis.command("--raw", "KEYS", "ckpt.run*").split())


class RedisHistoryTests(RedisCase, HistoryBehaviour):
    def setUp(self):
        return RedisCase.setUp(self)


class SharedRedisHistoryTests(RedisCase):
    @inlineCallbacks
    def test_two_processes_see_each_others_runs(self):
        other, _ = yield self.other_process()
        mine, theirs = run_at(T0, guid="a"), run_at(T0 + 1, guid="b", repo="other")
        yield self.history.record(mine)
        yield other.record(theirs)
        for history in (self.history, other):
            self.assertEqual(ids((yield history.list())), [theirs.id, mine.id])
            self.assertEqual(ids((yield history.list(repo="other"))), [theirs.id])
            self.assertEqual((yield history.get(mine.id)).to_dict(), mine.to_dict())
            self.assertEqual((yield history.count()), 2)
            self.assertEqual((yield history.completed("b")), {("other", "node!web1", "notify")})

    @inlineCallbacks
    def test_duplicate_recorded_through_the_other_process_is_refused(self):
        other, _ = yield self.other_process()
        self.assertTrue((yield self.history.record(run_at(T0))))
        self.assertFalse((yield other.record(run_at(T0 + 1))))
        self.assertEqual((yield other.count(event_guid="g1")), 1)

    @inlineCallbacks
    def test_concurrent_records_of_one_tuple_from_both_processes_exactly_one_wins(self):
        other, _ = yield self.other_process()
        pairs = [(run_at(T0 + i, guid=f"g{i}"), run_at(T0 + i + 0.5, guid=f"g{i}")) for i in range(50)]
        results = yield defer.gatherResults([defer.gatherResults([self.history.record(a), other.record(b)])
                                             for a, b in pairs])
        self.assertEqual([sorted(pair) for pair in results], [[False, True]] * 50)
        self.assertEqual((yield self.history.count()), 50)
        for (a, b), (won_a, _) in zip(pairs, results):
            winner = a if won_a else b
            self.assertEqual(ids((yield other.list(event_guid=winner.event_guid))), [winner.id])

    @inlineCallbacks
    def test_started_run_shows_running_in_the_other_process_until_it_is_recorded(self):
        other, _ = yield self.other_process()
        run = run_at(T0, repo="live")
        run.state, run.ended = "running", None
        yield shown(self.history, run)
        self.assertEqual([(r.id, r.state) for r in (yield other.list())], [(run.id, "running")])
        self.assertEqual(ids((yield other.list(state="running", repo="live"))), [run.id])
        self.assertEqual((yield other.list(state="ok")), [])
        self.assertEqual((yield other.get(run.id)).state, "running")
        self.assertEqual((yield other.count()), 0)  # counted once recorded
        self.assertEqual((yield other.completed("g1")), set())
        run.state, run.ended = "ok", T0 + 1
        yield self.history.record(run)
        self.assertEqual([(r.id, r.state) for r in (yield other.list())], [(run.id, "ok")])
        self.assertEqual(self.keys(), sorted(["ckpt.run." + run.id, "ckpt.runs", "ckpt.runs.repo.live",
                                              "ckpt.runs.service.node!web1", "ckpt.runs.action.notify",
                                              "ckpt.runs.state.ok", "ckpt.runs.done.g1"]))

    @inlineCallbacks
    def test_a_run_over_before_it_is_shown_writes_its_record_alone(self):
        from cockpit.backends.redis.runs import LIVE_AFTER

        other, _ = yield self.other_process()
        run = run_at(T0)
        run.state, run.ended = "running", None
        shown = self.history.started(run)
        self.assertEqual((yield other.list()), [])  # not shown yet
        run.state, run.ended = "ok", T0 + 0.1
        yield self.history.record(run)
        self.assertIsNone((yield shown))
        self.clock.advance(LIVE_AFTER)
        yield self.settle(self.history)
        self.assertEqual([(r.id, r.state) for r in (yield other.list())], [(run.id, "ok")])
        self.assertNotIn("ckpt.runs.live", self.keys())

    @inlineCallbacks
    def test_started_run_refused_at_its_record_leaves_nothing_shown(self):
        other, _ = yield self.other_process()
        yield other.record(run_at(T0))
        again = run_at(T0 + 1)
        again.state = "running"
        yield shown(self.history, again)
        again.state = "ok"
        self.assertFalse((yield self.history.record(again)))
        self.assertEqual((yield other.get(again.id)), None)
        self.assertEqual(len((yield other.list())), 1)

    @inlineCallbacks
    def test_run_of_a_process_that_is_gone_stops_showing_after_its_ttl(self):
        other, other_clock = yield self.other_process()
        run = run_at(T0)
        run.state = "running"
        yield shown(self.history, run)  # and then this process dies: its clock never moves again
        other_clock.advance(LIVE_TTL - 1)
        self.assertEqual(ids((yield other.list())), [run.id])
        other_clock.advance(2)
        self.assertEqual((yield other.list()), [])
        self.assertIsNone((yield other.get(run.id)))
        other_clock.advance(LIVE_RENEW)  # the other process's renewal forgets it for good
        yield self.settle(other)
        self.assertEqual(self.keys(), [])

    @inlineCallbacks
    def test_run_keeps_showing_while_its_process_renews_it(self):
        other, other_clock = yield self.other_process()
        run = run_at(T0)
        run.state = "running"
        yield shown(self.history, run)
        for _ in range(int(3 * LIVE_TTL / LIVE_RENEW)):
            self.clock.advance(LIVE_RENEW)
            other_clock.advance(LIVE_RENEW)
            yield self.settle(self.history)
        self.assertEqual([(r.id, r.state) for r in (yield other.list())], [(run.id, "running")])

    @inlineCallbacks
    def test_clean_stop_stops_showing_the_runs_it_never_recorded(self):
        other, _ = yield self.other_process()
        run = run_at(T0)
        run.state = "running"
        yield shown(self.history, run)
        yield self.history.stopService()
        self.assertEqual((yield other.list()), [])
        self.assertEqual(self.keys(), [])

    @inlineCallbacks
    def test_records_past_keep_runs_drop_the_oldest_as_they_are_written(self):
        history = self.start(self.make_history(self.clock, keep_runs=3))
        runs = [run_at(T0 + i, guid=f"g{i}") for i in range(10)]
        for run in runs:
            yield history.record(run)
        self.assertEqual(ids((yield history.list())), ids(reversed(runs[7:])))
        self.assertEqual((yield history.count(repo="demo", state="ok")), 3)
        self.assertEqual((yield history.completed("g6")), set())
        self.assertEqual(self.redis.command("ZCARD", "ckpt.runs.service.node!web1").strip(), "(integer) 3")
        self.assertEqual(len([key for key in self.keys() if key.startswith("ckpt.runs.done.")]), 3)

    @inlineCallbacks
    def test_filtered_page_goes_on_past_one_scan_step(self):
        self.history.scan_step = 4
        runs = [run_at(T0 + i, guid=f"g{i}", state="error" if i in (1, 2) else "ok") for i in range(30)]
        runs += [run_at(T0 + 30 + i, guid=f"e{i}", repo="big", state="error") for i in range(20)]
        for run in runs:
            yield self.history.record(run)
        # the smallest index is state=error (22 ids): the two in repo demo are its oldest
        self.assertEqual(ids((yield self.history.list(repo="demo", state="error"))),
                         [runs[2].id, runs[1].id])
        self.assertEqual((yield self.history.count(repo="demo", state="error")), 2)
        self.assertEqual(ids((yield self.history.list(limit=1, repo="demo", state="error"))), [runs[2].id])

    @inlineCallbacks
    def test_prune_goes_on_in_steps_and_leaves_no_keys_behind(self):
        self.history.prune_step = 2
        yield defer.gatherResults([self.history.record(run_at(T0 + i, guid=f"g{i}", repo=f"r{i % 3}"))
                                   for i in range(7)])
        self.clock.advance(2 * DAY)
        self.assertEqual((yield self.history.prune()), 7)
        self.assertEqual(self.keys(), [])

    @inlineCallbacks
    def test_repository_name_of_any_text_is_recorded_and_found(self):
        name = "bad \udc80 name"  # what a chat command may carry before its name is checked
        run = run_at(T0, guid="chat", repo=name, service=None, action="repo.create", state="error")
        self.assertTrue((yield self.history.record(run)))
        self.assertEqual(ids((yield self.history.list(repo=name))), [run.id])
        self.assertEqual((yield self.history.completed("chat")), {(name, "", "repo.create")})
        self.clock.advance(2 * DAY)
        self.assertEqual((yield self.history.prune()), 1)
        self.assertEqual(self.keys(), [])


class RedisAwayTests(RedisCase):
    @inlineCallbacks
    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.bus = yield self.connected_bus(self.redis.url)
        self.clock = Clock()
        self.clock.advance(T0)
        self.history = self.start(self.make_history(self.clock))

    @inlineCallbacks
    def test_record_made_while_redis_is_away_is_written_once_it_is_back(self):
        self.redis.stop()
        yield self.bus.when_disconnected()
        recorded = self.history.record(run_at(T0))
        self.assertNoResult(recorded)
        self.redis.start()
        yield self.bus.when_connected()
        self.clock.advance(RETRY_FIRST)
        self.assertTrue((yield recorded))
        self.assertEqual((yield self.history.count()), 1)

    @inlineCallbacks
    def test_record_still_waiting_for_redis_fails_when_the_history_stops(self):
        self.redis.stop()
        yield self.bus.when_disconnected()
        recorded = self.history.record(run_at(T0))
        yield self.history.stopService()
        self.failureResultOf(recorded)


class RunIdTests(TestCase):
    def test_run_ids_sort_by_creation(self):
        ids = [new_run_id(T0 + n) for n in range(100)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 100)

    def test_run_id_made_at_a_given_time_sorts_by_that_time(self):
        self.assertLess(new_run_id(T0), new_run_id(T0 + 0.000001))
        self.assertEqual(new_run_id(T0)[:14], f"{int(T0 * 1_000_000):014x}")
