"""What the chat asks the robot to show: lists and details, answered in the chat."""
from __future__ import annotations

from twisted.internet.defer import DeferredQueue, inlineCallbacks

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
