"""The action worker pool, with real worker processes."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from cockpit.events import EmailEvent
from cockpit.runs import new_run_id
from cockpit.workers import WorkerPool

ACTIONS = textwrap.dedent('''
    import os, sys, time

    def hello(service, event):
        print("printed", service.args["x"])
        service.log("logged", service.key, service.name, service.role)
        sys.stderr.write("to stderr\\n")
        return {"subject": event.subject if event is not None else None}

    def one_param(service):
        return "one"

    def boom(service, event):
        1 / 0

    def spin(service, event):
        while True:
            pass

    def die(service, event):
        os._exit(1)

    def chatty(service, event):
        print("x" * 200000)

    def stray(service, event):
        os.write(1, b"not json\\n")
        return "fine"

    def emits(service, event):
        service.emit("alarm", service="node!a", method="m", msg="hi")
        return "emitted"

    def bad_emit(service, event):
        service.emit("alarm", msg="no service field")

    def mails(service, event):
        service.send_mail("ops@example.com", "subject", "body")

    def pid(service, event):
        return os.getpid()

    def leave(service, event):
        sys.exit(3)
''')


class WorkerPoolTests(TestCase):
    timeout = 30

    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "actions.py"
        self.path.write_text(ACTIONS)
        self.emitted = []
        self.mails = []
        self.emit_result = None

    def start(self, size=1, timeout=1.0):
        def emit(data):
            self.emitted.append(data)
            return self.emit_result if self.emit_result is not None else defer.succeed(None)

        self.pool = WorkerPool(size, action_timeout=timeout, reactor=reactor, emit=emit,
                               send_mail=lambda mail: self.mails.append(mail))
        self.pool.startService()
        self.addCleanup(self.pool.stopService)

    def run_action(self, action, event=None, path=None, args=None):
        return self.pool.submit({
            "id": new_run_id(), "path": str(path or self.path), "action": action,
            "service": {"key": "node!web1", "role": "node", "instance": "web1", "repo": "demo",
                        "template": "node", "args": args or {"x": 1}},
            "event": event.to_dict() if event is not None else None})

    @inlineCallbacks
    def test_action_gets_service_and_event_and_its_output_is_captured(self):
        self.start()
        outcome = yield self.run_action("hello", EmailEvent(subject="disk full"))
        self.assertEqual(outcome.state, "ok")
        self.assertEqual(outcome.result, {"subject": "disk full"})
        self.assertIn("printed 1\n", outcome.log)
        self.assertIn("logged node!web1 web1 node\n", outcome.log)
        self.assertIn("to stderr\n", outcome.log)
        self.assertLessEqual(outcome.started, outcome.ended)
        self.assertEqual((yield self.run_action("one_param")).result, "one")

    @inlineCallbacks
    def test_raising_action_fails_with_its_traceback_and_the_next_run_succeeds(self):
        self.start()
        outcome = yield self.run_action("boom")
        self.assertEqual(outcome.state, "error")
        self.assertIn("Traceback", outcome.log)
        self.assertIn("ZeroDivisionError", outcome.log)
        self.assertEqual((yield self.run_action("one_param")).state, "ok")

    @inlineCallbacks
    def test_sys_exit_in_an_action_fails_only_that_run(self):
        self.start()
        self.assertIn("SystemExit", (yield self.run_action("leave")).log)
        self.assertEqual((yield self.run_action("one_param")).state, "ok")

    @inlineCallbacks
    def test_hanging_action_times_out_and_its_worker_is_replaced(self):
        self.start(size=1, timeout=1.0)
        before = yield self.run_action("pid")
        hung, queued = self.run_action("spin"), self.run_action("pid")  # queued behind the hung one
        outcome = yield hung
        self.assertEqual(outcome.state, "timeout")
        self.assertIn("action_timeout", outcome.log)
        after = yield queued
        self.assertEqual(after.state, "ok")
        self.assertNotEqual(after.result, before.result)
        self.assertEqual(self.pool.replaced, 1)

    @inlineCallbacks
    def test_worker_that_dies_fails_only_its_run(self):
        self.start(size=2)
        outcomes = yield defer.gatherResults([self.run_action("die"), self.run_action("one_param"),
                                              self.run_action("one_param")])
        self.assertEqual([o.state for o in outcomes], ["error", "ok", "ok"])
        self.assertIn("died (exit code 1)", outcomes[0].log)
        self.assertEqual((yield self.run_action("one_param")).state, "ok")

    @inlineCallbacks
    def test_log_is_bounded(self):
        self.start()
        outcome = yield self.run_action("chatty")
        self.assertLess(len(outcome.log), 70 * 1024)
        self.assertIn("log truncated", outcome.log)

    @inlineCallbacks
    def test_stray_writes_to_file_descriptor_1_do_not_break_the_protocol(self):
        self.start()
        self.assertEqual((yield self.run_action("stray")).result, "fine")

    @inlineCallbacks
    def test_emit_goes_to_the_parent_and_the_run_waits_for_it(self):
        self.start()
        held = defer.Deferred()
        self.emit_result = held
        result = self.run_action("emits")
        while not self.emitted:
            yield deferLater(0.01)
        self.assertFalse(result.called)
        self.assertEqual((self.emitted[0]["type"], self.emitted[0]["service"], self.emitted[0]["source"]),
                         ("alarm", "node!a", "ays"))
        held.callback(None)
        self.assertEqual((yield result).state, "ok")

    @inlineCallbacks
    def test_failed_emit_fails_the_run(self):
        self.start()
        self.emit_result = defer.fail(RuntimeError("redis is away"))
        outcome = yield self.run_action("emits")
        self.assertEqual(outcome.state, "error")
        self.assertIn("redis is away", outcome.log)

    @inlineCallbacks
    def test_invalid_emit_raises_in_the_action(self):
        self.start()
        outcome = yield self.run_action("bad_emit")
        self.assertEqual(outcome.state, "error")
        self.assertIn("service: field required", outcome.log)
        self.assertEqual(self.emitted, [])

    @inlineCallbacks
    def test_send_mail_goes_to_the_parent(self):
        self.start()
        self.assertEqual((yield self.run_action("mails")).state, "ok")
        self.assertEqual(self.mails, [{"to": ["ops@example.com"], "cc": [], "subject": "subject",
                                       "body": "body", "bodytype": "text"}])

    @inlineCallbacks
    def test_changed_actions_file_is_reloaded(self):
        self.start()
        path = self.dir / "other.py"
        path.write_text("def a(service, event):\n    return 1\n")
        self.assertEqual((yield self.run_action("a", path=path)).result, 1)
        path.write_text("def a(service, event):\n    return 2\n")
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 10_000_000))
        self.assertEqual((yield self.run_action("a", path=path)).result, 2)

    @inlineCallbacks
    def test_many_runs_spread_over_the_workers(self):
        self.start(size=2)
        while self.pool.health()["ready"] < 2:  # a worker still starting would get no share
            yield deferLater(0.01)
        outcomes = yield defer.gatherResults([self.run_action("pid") for _ in range(200)])
        self.assertEqual({o.state for o in outcomes}, {"ok"})
        self.assertEqual(len({o.result for o in outcomes}), 2)


def deferLater(seconds):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)
