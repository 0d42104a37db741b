"""The AYS robot, with real worker processes, a real Redis where the bus matters and a Clock where time does."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit.ays import Robot
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.embedded.runs import SqliteRunHistory
from cockpit.backends.redis import RedisBus
from cockpit.bus import AYS_GROUP, Delivery
from cockpit.config import RedisSection
from cockpit.events import AlarmEvent, EmailEvent, TelegramEvent
from cockpit.repos import Invalid, NotFound
from cockpit.runs import DONE_STATES
from cockpit.workers import WorkerPool
from tests.redis_server import bus_on_shared_server, shared_server
from tests.wiring import disk_catalog, started

SCHEMA = "name = type:str default:'web'\nport = type:int default:22\n"
SERVICE = "events.email =\n    notify,\n    escalate,\n"
ACTIONS = textwrap.dedent('''
    import os, time

    def install(service, event):
        service.log("installing", service.key, "port", service.args["port"])
        return service.args

    def notify(service, event):
        service.log("subject:", event.subject)

    def escalate(service, event):
        print("escalating", event.subject)
        if event.subject == "raise":
            raise RuntimeError("escalation failed")

    def hold(service, event):
        while not os.path.exists(service.args["release"]):
            time.sleep(0.01)

    def tick(service, event):
        return "ticked"

    def alarm_out(service, event):
        service.emit("alarm", service="node!web1", method="check", msg="from an action")
''')


def recorded(robot, action, event_guid=None):
    """Fires with the next run of ``action`` (for the event ``event_guid``, if given) once it is recorded."""
    return robot.when_run(lambda run: run.action == action and run.state in DONE_STATES
                          and (event_guid is None or run.event_guid == event_guid))


def first_of(*deferreds):
    """Fires with the first result of ``deferreds``; the others are cancelled."""
    def settle(result):
        for d in deferreds:
            if not d.called:
                d.cancel()
        return result[0]

    return defer.DeferredList(list(deferreds), fireOnOneCallback=True, fireOnOneErrback=True,
                              consumeErrors=True).addCallback(settle)


class RobotCase(TestCase):
    timeout = 30
    workers = 2

    def make_bus(self):
        return MemoryBus(clock=reactor)

    @inlineCallbacks
    def start_robot(self, clock=None, repos_dir=None, bus=None, catalog=None):
        """A started robot on ``catalog`` (started here, stopped after the robot), or on a repos directory."""
        base = Path(self.mktemp()).absolute()
        bus = bus or self.bus
        history = SqliteRunHistory(base / "runs.sqlite", reactor)
        pool = WorkerPool(self.workers, action_timeout=2.0, reactor=reactor)
        if catalog is not None:
            catalog.startService()
            self.addCleanup(catalog.stopService)
        robot = Robot(catalog or disk_catalog(repos_dir or self.repos_dir, clock), bus, history, pool, clock=clock or reactor)
        robot.startService()
        self.addCleanup(robot.stopService)
        yield robot.ready
        return robot

    @inlineCallbacks
    def setUp(self):
        self.repos_dir = Path(self.mktemp()).absolute()
        self.bus = yield started(self, self.make_bus())
        self.robot = yield self.start_robot()

    @inlineCallbacks
    def make_repo(self, robot=None, service_hrd=SERVICE, blueprint="node__web1:\n  port: 2222\n"):
        robot = robot or self.robot
        yield robot.catalog.create_repo("demo")
        yield robot.catalog.put_template("demo", "node", {"schema.hrd": SCHEMA, "service.hrd": service_hrd,
                                                          "actions.py": ACTIONS})
        yield robot.catalog.add_blueprint("demo", "main.yaml", blueprint)
        runs, finished = yield robot.execute_blueprint("demo", "main.yaml")
        done = yield finished
        return runs, done


class BlueprintTests(RobotCase):
    @inlineCallbacks
    def test_blueprint_execution_creates_services_and_runs_install(self):
        runs, done = yield self.make_repo()
        self.assertEqual([(r.service, r.action, r.state) for r in done], [("node!web1", "install", "ok")])
        self.assertEqual(runs[0].id, done[0].id)
        self.assertIn("installing node!web1 port 2222", done[0].log)
        service = self.robot.catalog.get_service("demo", "node!web1")
        self.assertEqual(service["args"], {"name": "web", "port": 2222})
        self.assertEqual(service["states"]["install"], "ok")
        self.assertEqual(service["events"], {"email": ["notify", "escalate"]})
        blueprint = yield self.robot.catalog.get_blueprint("demo", "main")
        self.assertEqual((blueprint["state"], blueprint["error"]), ("ok", None))
        recorded = yield self.robot.get_run(done[0].id)
        self.assertEqual((recorded["state"], recorded["trigger"]["kind"]), ("ok", "blueprint"))
        yield self.robot.catalog.flush()
        on_disk = json.loads((self.repos_dir / "demo" / "services" / "node!web1" / "service.json").read_text())
        self.assertEqual(on_disk["states"]["install"], "ok")

    @inlineCallbacks
    def test_failing_blueprint_is_kept_with_its_error(self):
        yield self.make_repo()
        yield self.robot.catalog.add_blueprint("demo", "bad", "nope__x: {}\n")
        error = yield self.assertFailure(self.robot.execute_blueprint("demo", "bad"), Invalid)
        self.assertIn("no template 'nope'", str(error))
        blueprint = yield self.robot.catalog.get_blueprint("demo", "bad.yaml")
        self.assertEqual(blueprint["state"], "error")
        self.assertIn("no template 'nope'", blueprint["error"])
        self.assertTrue((self.repos_dir / "demo" / "blueprints" / "bad.yaml").is_file())

    @inlineCallbacks
    def test_missing_required_argument_fails_the_blueprint_clearly(self):
        yield self.robot.catalog.create_repo("demo")
        yield self.robot.catalog.put_template("demo", "node", {"schema.hrd": "host = required\n",
                                                               "actions.py": ACTIONS})
        yield self.robot.catalog.add_blueprint("demo", "main", "node__a: {}\n")
        error = yield self.assertFailure(self.robot.execute_blueprint("demo", "main"), Invalid)
        self.assertEqual(str(error), "blueprint block node__a: argument 'host' is required")

    @inlineCallbacks
    def test_failed_install_stops_the_installs_after_it(self):
        yield self.robot.catalog.create_repo("demo")
        yield self.robot.catalog.put_template("demo", "node", {"actions.py": "def install(service):\n    1/0\n"})
        yield self.robot.catalog.add_blueprint("demo", "main", "node__a:\nnode__b:\n")
        runs, finished = yield self.robot.execute_blueprint("demo", "main")
        done = yield finished
        self.assertEqual([(r.service, r.state) for r in done], [("node!a", "error"), ("node!b", "error")])
        self.assertIn("ZeroDivisionError", done[0].log)
        self.assertIn("not started: the install of node!a ended in error", done[1].log)
        blueprint = yield self.robot.catalog.get_blueprint("demo", "main")
        self.assertEqual((blueprint["state"], blueprint["error"]), ("error", "the install of node!a ended in error"))

    @inlineCallbacks
    def test_unknown_action_is_not_found(self):
        yield self.make_repo()
        self.assertRaises(NotFound, self.robot.run_action, "demo", "node!web1", "nope")
        self.assertRaises(NotFound, self.robot.run_action, "demo", "node!nobody", "install")

    @inlineCallbacks
    def test_robot_reloads_its_repositories_after_a_restart(self):
        yield self.make_repo()
        yield self.robot.stopService()
        robot = yield self.start_robot()
        self.assertEqual(robot.catalog.get_service("demo", "node!web1")["states"]["install"], "ok")
        self.assertEqual(robot.catalog.subscribers("EMAIL")[0].service, "node!web1")


class WaitingTests(RobotCase):
    @inlineCallbacks
    def test_when_run_offers_a_run_as_it_starts_and_once_it_is_recorded(self):
        yield self.make_repo()
        states = []
        started = self.robot.when_run(lambda run: states.append(run.state) or run.state == "running")
        done = recorded(self.robot, "tick")
        run, finished = self.robot.run_action("demo", "node!web1", "tick")
        self.assertIs((yield started), run)
        self.assertIs((yield done), run)
        self.assertEqual(states, ["running"])
        self.assertEqual(run.result, "ticked")
        self.assertEqual((yield finished), run)

    @inlineCallbacks
    def test_when_recorded_fires_with_a_recorded_run_and_refuses_an_unknown_one(self):
        _, [install] = yield self.make_repo()
        run = yield self.robot.when_recorded(install.id)
        self.assertEqual((run.id, run.state), (install.id, "ok"))
        yield self.assertFailure(self.robot.when_recorded("nope"), NotFound)

    @inlineCallbacks
    def test_a_predicate_that_raises_fails_its_waiter_alone(self):
        yield self.make_repo()
        broken = self.robot.when_run(lambda run: 1 / 0)
        done = recorded(self.robot, "tick")
        self.robot.run_action("demo", "node!web1", "tick")
        yield self.assertFailure(broken, ZeroDivisionError)
        self.assertEqual((yield done).state, "ok")

    @inlineCallbacks
    def test_waiters_are_cancelled_when_the_robot_stops(self):
        never = self.robot.when_run(lambda run: False)
        yield self.robot.stopService()
        self.failureResultOf(never, defer.CancelledError)


class EventTests(RobotCase):
    def make_bus(self):
        _, bus = bus_on_shared_server(claim_idle=0.2)
        return bus

    def count(self, robot=None, **filters):
        return (robot or self.robot).history.count(**filters)

    @inlineCallbacks
    def test_email_runs_subscribed_actions_with_the_email_as_payload(self):
        yield self.make_repo()
        event = EmailEvent(subject="disk full on web1", to=["ops@example.com"])
        done = defer.gatherResults([recorded(self.robot, action, event.guid) for action in ("notify", "escalate")])
        acknowledged = self.robot.consumer.when_handled(self.robot.consumer.handled + 1)
        yield self.bus.publish(event)
        yield done
        self.assertEqual((yield self.count(event_guid=event.guid)), 2)
        runs = yield self.robot.list_runs(event_guid=event.guid)
        self.assertEqual(sorted((r["action"], r["state"]) for r in runs), [("escalate", "ok"), ("notify", "ok")])
        for run in runs:
            self.assertIn("disk full on web1", run["log"])
            self.assertEqual(run["trigger"], {"kind": "event", "event_type": "email", "event_guid": event.guid})
        yield acknowledged
        self.assertEqual((yield self.bus.pending(AYS_GROUP)), 0)

    @inlineCallbacks
    def test_entry_is_acknowledged_only_once_its_runs_are_recorded(self):
        release = Path(self.mktemp()).absolute()
        yield self.make_repo(service_hrd="events.alarm = hold\n",
                             blueprint="node__web1:\n  port: 1\n")
        # the hold action needs to know its release file: give it through the service args
        self.robot.catalog.repos["demo"].services["node!web1"].args["release"] = str(release)
        event = AlarmEvent(service="node!web1", msg="x")
        running = self.robot.when_run(lambda run: run.action == "hold" and run.state == "running")
        acknowledged = self.robot.consumer.when_handled(self.robot.consumer.handled + 1)
        yield self.bus.publish(event)
        yield running
        self.assertEqual((yield self.bus.pending(AYS_GROUP)), 1)
        self.assertFalse(acknowledged.called)
        release.write_text("go")
        yield acknowledged
        self.assertEqual((yield self.bus.pending(AYS_GROUP)), 0)
        self.assertEqual((yield self.count(event_guid=event.guid)), 1)

    @inlineCallbacks
    def test_redelivered_event_does_not_run_again(self):
        yield self.make_repo()
        event = EmailEvent(subject="once")
        yield self.robot.handle_event(event, Delivery("ckpt.email", "1-0", 1))
        yield self.robot.handle_event(event, Delivery("ckpt.email", "1-0", 2))
        self.assertEqual((yield self.count(event_guid=event.guid)), 2)  # notify and escalate, once each
        self.assertEqual(self.robot.active, {})

    @inlineCallbacks
    def test_same_event_twice_at_once_runs_once(self):
        yield self.make_repo()
        event = EmailEvent(subject="twice")
        yield defer.gatherResults([self.robot.handle_event(event), self.robot.handle_event(event)])
        self.assertEqual((yield self.count(event_guid=event.guid)), 2)

    @inlineCallbacks
    def test_failing_action_is_recorded_and_the_entry_still_acknowledged(self):
        yield self.make_repo()
        event = EmailEvent(subject="raise")
        done = defer.gatherResults([recorded(self.robot, action, event.guid) for action in ("notify", "escalate")])
        acknowledged = self.robot.consumer.when_handled(self.robot.consumer.handled + 1)
        yield self.bus.publish(event)
        yield done
        self.assertEqual((yield self.count(event_guid=event.guid)), 2)
        [run] = yield self.robot.list_runs(event_guid=event.guid, action="escalate")
        self.assertEqual(run["state"], "error")
        self.assertIn("RuntimeError: escalation failed", run["log"])
        yield acknowledged
        self.assertEqual((yield self.bus.pending(AYS_GROUP)), 0)

    @inlineCallbacks
    def test_emit_from_an_action_publishes_an_event(self):
        yield self.make_repo(service_hrd="events.generic = alarm_out\n")
        seen: Deferred = Deferred()
        sub = self.bus.subscribe(lambda event: seen.called or seen.callback(event), ["alarm"])
        self.addCleanup(sub.cancel)
        yield self.bus.when_live()
        yield self.robot.run_action("demo", "node!web1", "alarm_out")[1]
        alarm = yield seen
        self.assertEqual((alarm.msg, alarm.source), ("from an action", "ays"))

    @inlineCallbacks
    def test_chat_commands_do_their_work_and_answer_in_the_chat(self):
        answers = DeferredQueue()
        sub = self.bus.subscribe(lambda e: answers.put(e) if e.io == "output" else None, ["telegram"])
        self.addCleanup(sub.cancel)
        yield self.bus.when_live()

        @inlineCallbacks
        def command(command_name, **args):
            yield self.bus.publish(TelegramEvent(io="input", action=command_name, args={"chat_id": 42, **args}))
            answer = yield answers.get()
            self.assertEqual((answer.action, answer.args["chat_id"]), ("message", 42))
            return answer.args["msg"]

        self.assertEqual((yield command("repo.create", name="env du-conv2")), "Repository env du-conv2 created.")
        self.assertIn("already exists", (yield command("repo.create", name="env du-conv2")))
        yield self.robot.catalog.put_template("env du-conv2", "node", {"actions.py": ACTIONS})
        reply = yield command("bp.create", name="1_nodes.yaml", content="node__cpu1:\n  port: 1\n")
        self.assertIn("Blueprint 1_nodes.yaml stored in env du-conv2 and executed.", reply)
        self.assertIn("node!cpu1 install: ok", reply)
        reply = yield command("bp.execute", name="1_nodes.yaml")
        self.assertIn("node!cpu1 install: ok", reply)
        reply = yield command("service.execute", name="node!cpu1", action="tick")
        self.assertEqual(reply, "node!cpu1 tick: ok")
        self.assertIn("no service 'node!gone'", (yield command("service.execute", name="node!gone", action="x")))
        self.assertEqual((yield command("repo.delete", name="env du-conv2")), "Repository env du-conv2 deleted.")
        robot_runs = yield self.robot.list_runs(action="repo.create")
        self.assertEqual([r["state"] for r in robot_runs], ["error", "ok"])

    @inlineCallbacks
    def test_change_made_by_another_process_is_picked_up(self):
        from cockpit.ays_catalog import Catalog
        from cockpit.backends.redis.catalog import RedisCatalogStore

        def redis_catalog(follow=True):
            base = Path(self.mktemp()).absolute()
            return Catalog(RedisCatalogStore(self.bus, base / "actions", reactor), reactor, follow=follow)

        mine = redis_catalog()
        robot = yield self.start_robot(catalog=mine)
        other = redis_catalog(follow=False)  # it learns of changes only when it asks
        other.startService()
        self.addCleanup(other.stopService)
        yield other.ready
        yield self.make_repo(robot)
        self.assertNotIn("demo", other.repos)
        yield other.sync()
        self.assertEqual(sorted(other.repos["demo"].services), ["node!web1"])
        self.assertEqual(other.subscribers("email")[0].service, "node!web1")


class RecurringTests(RobotCase):
    @inlineCallbacks
    def test_recurring_action_fires_at_its_period(self):
        clock = Clock()
        robot = yield self.start_robot(clock=clock, repos_dir=Path(self.mktemp()).absolute())
        yield self.make_repo(robot, service_hrd="recurring.tick = 5s\n")
        clock.advance(1)  # the first tick only notes the period it is in
        for second in range(2, 5):
            clock.advance(1)
        self.assertEqual([r for r in robot.active.values() if r.action == "tick"], [])
        ticked = recorded(robot, "tick")
        clock.advance(1)  # t=5: a new period
        yield ticked
        self.assertEqual((yield robot.history.count(action="tick")), 1)
        for _ in range(4):
            clock.advance(1)
        self.assertEqual(list(robot.active.values()), [])  # no run started within the period
        self.assertEqual((yield robot.history.count(action="tick")), 1)
        ticked = recorded(robot, "tick")
        clock.advance(1)  # t=10
        yield ticked
        self.assertEqual((yield robot.history.count(action="tick")), 2)
        [run, _] = yield robot.list_runs(action="tick")
        self.assertEqual((run["trigger"]["kind"], run["result"]), ("recurring", "ticked"))


class RecurringAcrossProcessesTests(RobotCase):
    def make_bus(self):
        _, bus = bus_on_shared_server()
        return bus

    @inlineCallbacks
    def test_recurring_action_fires_once_per_period_across_processes(self):
        clock_a, clock_b = Clock(), Clock()
        robot_a = yield self.start_robot(clock=clock_a)
        yield self.make_repo(robot_a, service_hrd="recurring.tick = 5s\n")
        other_bus = RedisBus(RedisSection(url=shared_server().url), reactor=reactor)
        other_bus.startService()
        self.addCleanup(other_bus.stopService)
        yield other_bus.when_connected()
        robot_b = yield self.start_robot(clock=clock_b, bus=other_bus)
        ticked = first_of(recorded(robot_a, "tick"), recorded(robot_b, "tick"))
        for clock in (clock_a, clock_b):
            clock.advance(4)
        for clock in (clock_a, clock_b):
            clock.advance(1)
        yield ticked
        # each robot claimed the period on its own connection: once these answer, both claims have theirs
        yield defer.gatherResults([self.bus.execute("PING"), other_bus.execute("PING")])
        self.assertEqual((robot_a.active, robot_b.active), ({}, {}))
        counts = yield defer.gatherResults([robot_a.history.count(action="tick"),
                                            robot_b.history.count(action="tick")])
        self.assertEqual(sum(counts), 1)
