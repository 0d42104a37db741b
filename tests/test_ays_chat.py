"""What the chat asks the robot to show: lists and details, answered in the chat."""
from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredQueue, inlineCallbacks
from twisted.internet.task import Clock

from cockpit.events import TelegramEvent
from tests.test_ays import RobotCase


class ChatViewTests(RobotCase):
    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.answers = DeferredQueue()
        sub = self.bus.subscribe(lambda e: self.answers.put(e) if e.io == "output" else None, ["telegram"])
        self.addCleanup(sub.cancel)
        yield self.bus.when_live()

    @inlineCallbacks
    def command(self, action, **args):
        yield self.bus.publish(TelegramEvent(io="input", action=action, args={"chat_id": 7, **args}))
        answer = yield self.answers.get()
        self.assertEqual((answer.action, answer.args["chat_id"]), ("message", 7))
        return answer.args["msg"]

    @inlineCallbacks
    def test_lists_and_details_are_answered_in_the_chat(self):
        self.assertIn("no repository yet", (yield self.command("repo.list")))
        yield self.make_repo()
        self.assertEqual("Repositories:\n- demo", (yield self.command("repo.list")))
        self.assertEqual("Blueprints in demo:\n- main.yaml (ok)", (yield self.command("bp.list", repo="demo")))
        shown = yield self.command("bp.show", repo="demo", name="main")
        self.assertIn("main.yaml in demo (ok)", shown)
        self.assertIn("node__web1:", shown)
        listed = yield self.command("service.list", repo="demo")
        self.assertEqual("Services in demo:\n- node!web1 install: ok", listed)
        self.assertIn("with the role db", (yield self.command("service.list", repo="demo", role="db")))
        details = yield self.command("service.show", name="node!web1")
        self.assertIn('args: {"name": "web", "port": 2222}', details)
        self.assertIn("install: ok", details)
        self.assertIn("notify", details)
        self.assertEqual("Blueprint main.yaml deleted from demo.",
                         (yield self.command("bp.delete", repo="demo", name="main")))
        self.assertIn("There is no blueprint in demo", (yield self.command("bp.list", repo="demo")))
        self.assertIn("bp.show failed", (yield self.command("bp.show", repo="demo", name="main")))


class ChatRunTimeTests(RobotCase):
    @inlineCallbacks
    def start_robot(self, clock=None, **options):
        self.clock = Clock()
        self.clock.advance(1_700_000_000.5)
        return (yield super().start_robot(clock=self.clock, **options))

    @inlineCallbacks
    def test_a_chat_command_is_recorded_as_a_run_at_the_robot_clock(self):
        recorded, record = Deferred(), self.robot.record

        def record_and_tell(run):
            d = record(run)
            d.addCallback(lambda result: (recorded.called or recorded.callback(run), result)[1])
            return d

        self.patch(self.robot, "record", record_and_tell)
        yield self.bus.when_live()
        yield self.bus.publish(TelegramEvent(io="input", action="repo.create", args={"chat_id": 7, "name": "dated"}))
        yield recorded
        [run] = yield self.robot.list_runs(action="repo.create")
        self.assertEqual(("ok", 1_700_000_000.5, 1_700_000_000.5), (run["state"], run["started"], run["ended"]))
        self.assertEqual(f"{1_700_000_000_500_000:014x}", run["id"][:14])
