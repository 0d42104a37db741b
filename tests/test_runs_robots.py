"""Two AYS robots (two processes' worth: a bus, a run history and a worker each) on one Redis run history."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from cockpit.ays import Robot
from cockpit.backends.redis import RedisBus
from cockpit.bus import Delivery
from cockpit.config import RedisSection
from cockpit.events import EmailEvent
from cockpit.workers import WorkerPool
from tests.redis_server import shared_server
from tests.test_ays import ACTIONS, SERVICE
from tests.wiring import backend_for, disk_catalog


class RobotsSharingRunsTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def start_robot(self):
        bus = RedisBus(RedisSection(url=shared_server().url), reactor=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        yield bus.when_connected()
        history = backend_for(bus).run_history(reactor)
        robot = Robot(disk_catalog(self.repos_dir), bus, history, WorkerPool(1, action_timeout=5.0, reactor=reactor),
                      clock=reactor)
        robot.startService()
        self.addCleanup(robot.stopService)
        yield robot.ready
        return robot

    @inlineCallbacks
    def setUp(self):
        shared_server().flush()
        self.repos_dir = Path(self.mktemp()).absolute()
        self.one = yield self.start_robot()
        yield self.one.create_repo("demo")
        yield self.one.put_template("demo", "node", {"service.hrd": SERVICE, "actions.py": ACTIONS})
        yield self.one.add_blueprint("demo", "main.yaml", "node__web1:\n  port: 1\n")
        _, finished = yield self.one.execute_blueprint("demo", "main.yaml")
        [self.install] = yield finished
        self.other = yield self.start_robot()  # reads the repository from the same disk at its start

    @inlineCallbacks
    def test_runs_made_through_one_robot_are_listed_by_the_other(self):
        run, finished = self.one.run_action("demo", "node!web1", "tick")
        yield finished
        listed = yield self.other.list_runs()
        self.assertEqual([(r["id"], r["action"], r["state"]) for r in listed],
                         [(run.id, "tick", "ok"), (self.install.id, "install", "ok")])
        self.assertEqual((yield self.other.get_run(run.id))["result"], "ticked")
        self.assertEqual([r["id"] for r in (yield self.other.list_runs(action="install"))], [self.install.id])

    @inlineCallbacks
    def test_event_redelivered_to_the_other_robot_does_not_run_again(self):
        event = EmailEvent(subject="once")
        yield self.one.handle_event(event, Delivery("ckpt.email", "1-0", 1))
        first = yield self.one.list_runs(event_guid=event.guid)
        yield self.other.handle_event(event, Delivery("ckpt.email", "1-0", 2))
        self.assertEqual((yield self.other.list_runs(event_guid=event.guid)), first)
        self.assertEqual(sorted(r["action"] for r in first), ["escalate", "notify"])

    @inlineCallbacks
    def test_one_event_handled_by_both_robots_at_once_completes_each_action_once(self):
        event = EmailEvent(subject="twice")
        yield defer.gatherResults([self.one.handle_event(event), self.other.handle_event(event)])
        runs = yield self.other.list_runs(event_guid=event.guid)
        self.assertEqual(sorted(r["action"] for r in runs), ["escalate", "notify"])
        self.assertEqual((yield self.one.history.count(event_guid=event.guid)), 2)
        counts = yield defer.gatherResults([self.one.history.count(action=a) for a in ("notify", "escalate")])
        self.assertEqual(counts, [1, 1])
