"""The action worker pool, with real worker processes."""
from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from cockpit.events import EmailEvent
from cockpit.runs import new_run_id
from cockpit import workers
from cockpit.workers import EXIT_GRACE, WorkerPool

ACTIONS = textwrap.dedent('''
    import os, subprocess, sys, time

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

    def tell(service, pid):
        service.emit("alarm", service="node!a", method="started", msg=str(pid))

    def fork_and_wait(service, event):
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        tell(service, child)
        os.waitpid(child, 0)

    def fork_and_return(service, event):
        child = os.fork()
        if child == 0:
            try:
                service.emit("alarm", service="node!a", method="m", msg="from the forked child")
            except RuntimeError:
                return "child"  # and this process ends here, without a word on the protocol
            os._exit(3)
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])

    def setsid_daemon(service, event):
        return subprocess.Popen(["sleep", "60"], start_new_session=True).pid

    def orphaned_setsid_daemon(service, event):
        # the middle process exits at once: its setsid child is an orphan
        out = subprocess.run([sys.executable, "-c", "import subprocess; "
                              "print(subprocess.Popen(['sleep', '60'], start_new_session=True, "
                              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
                             capture_output=True, check=True).stdout
        return int(out)

    def setsid_grandchild_and_hang(service, event):
        tell(service, orphaned_setsid_daemon(service, event))
        time.sleep(60)

    def hang(service, event):
        tell(service, os.getpid())
        time.sleep(60)

    def hog(service, event):
        return len(bytearray(service.args["bytes"]))

    def hog_in_a_child(service, event):
        return subprocess.run([sys.executable, "-c", f"bytearray({service.args['bytes']})"],
                              capture_output=True, text=True).stderr

    def read_stdin(service, event):
        return subprocess.run(["cat"], capture_output=True, timeout=5).stdout.decode()
''')


class WorkerTestCase(TestCase):
    """Real worker processes running ACTIONS."""

    timeout = 30

    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "actions.py"
        self.path.write_text(ACTIONS)
        self.emitted = []
        self.mails = []
        self.emit_result = None

    def start(self, size=1, timeout=1.0, clock=None, memory=1 << 30):
        def emit(data):
            self.emitted.append(data)
            waiters, self.emit_waiters = self.emit_waiters, []
            for waiter in waiters:
                waiter.callback(data)
            return self.emit_result if self.emit_result is not None else defer.succeed(None)

        self.emit_waiters = []
        self.pool = WorkerPool(size, action_timeout=timeout, reactor=reactor, emit=emit,
                               send_mail=lambda mail: self.mails.append(mail), clock=clock,
                               action_memory=memory)
        self.pool.startService()

        def stop():
            d = self.pool.stopService()
            if clock is not None:
                clock.advance(3600)  # past the grace a run still going gets at a stop
            return d

        self.addCleanup(stop)

    def next_emit(self):
        d = defer.Deferred()
        self.emit_waiters.append(d)
        return d

    @inlineCallbacks
    def started(self, action, **kwargs):
        """Submit ``action``, which tells a pid; fires with (its run, that pid)."""
        told = self.next_emit()
        run = self.run_action(action, **kwargs)
        pid = int((yield told)["msg"])
        return run, pid

    def assertGone(self, pid):
        """Dead and reaped."""
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertFalse(os.path.exists(f"/proc/{pid}"))

    def run_action(self, action, event=None, path=None, args=None):
        return self.pool.submit({
            "id": new_run_id(reactor.seconds()), "path": str(path or self.path), "action": action,
            "service": {"key": "node!web1", "role": "node", "instance": "web1", "repo": "demo",
                        "template": "node", "args": args or {"x": 1}},
            "event": event.to_dict() if event is not None else None})


class WorkerPoolTests(WorkerTestCase):
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
        emitted = self.next_emit()
        result = self.run_action("emits")
        yield emitted
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
        yield self.pool.when_ready()  # a worker still starting would get no share
        outcomes = yield defer.gatherResults([self.run_action("pid") for _ in range(200)])
        self.assertEqual({o.state for o in outcomes}, {"ok"})
        self.assertEqual(len({o.result for o in outcomes}), 2)


class ProcessesActionsStartTests(WorkerTestCase):
    """What an action starts dies with it; workers and health see through forks."""

    @inlineCallbacks
    def test_forking_action_times_out_at_its_deadline_and_its_child_dies(self):
        clock = task.Clock()
        self.start(size=1, timeout=10.0, clock=clock)
        run, child = yield self.started("fork_and_wait")
        clock.advance(9.9)
        self.assertFalse(run.called)
        clock.advance(0.1)
        outcome = yield run
        self.assertEqual(outcome.state, "timeout")
        self.assertIn("every process it started", outcome.log)
        self.assertGone(child)
        self.assertEqual((yield self.run_action("one_param")).state, "ok")
        yield self.pool.when_ready()
        health = self.pool.health()
        self.assertEqual((health["ok"], health["workers"], health["ready"]), (True, 1, 1))

    @inlineCallbacks
    def test_forked_child_cannot_speak_the_protocol_nor_run_on(self):
        self.start()
        before = yield self.run_action("pid")
        outcome = yield self.run_action("fork_and_return")
        self.assertEqual((outcome.state, outcome.result), ("ok", 0))  # its emit was refused; it ended there
        self.assertEqual(self.emitted, [])
        after = yield self.run_action("pid")
        self.assertEqual((after.state, after.result), ("ok", before.result))
        self.assertEqual(self.pool.replaced, 0)

    @inlineCallbacks
    def test_setsid_daemon_dies_when_its_run_ends(self):
        self.start()
        for action in ("setsid_daemon", "orphaned_setsid_daemon"):
            outcome = yield self.run_action(action)
            self.assertEqual(outcome.state, "ok")
            self.assertIn(f"they were killed: {outcome.result}", outcome.log)
            self.assertGone(outcome.result)
        self.assertEqual(self.pool.replaced, 0)

    @inlineCallbacks
    def test_setsid_grandchild_dies_at_a_timeout(self):
        clock = task.Clock()
        self.start(timeout=10.0, clock=clock)
        run, grandchild = yield self.started("setsid_grandchild_and_hang")
        clock.advance(10.0)
        self.assertEqual((yield run).state, "timeout")
        self.assertGone(grandchild)

    @inlineCallbacks
    def test_subprocess_of_an_action_reads_no_protocol_from_stdin(self):
        self.start()
        self.assertEqual((yield self.run_action("read_stdin")).result, "")
        self.assertEqual((yield self.run_action("one_param")).state, "ok")

    @inlineCallbacks
    def test_action_over_action_memory_fails_saying_so_and_the_next_run_succeeds(self):
        self.start(memory=256 << 20)
        before = yield self.run_action("pid")
        outcome = yield self.run_action("hog", args={"bytes": 512 << 20})
        self.assertEqual(outcome.state, "error")
        self.assertIn("MemoryError", outcome.log)
        self.assertIn("exceeded [ays] action_memory (268435456 bytes", outcome.log)
        self.assertEqual((yield self.run_action("hog", args={"bytes": 64 << 20})).result, 64 << 20)
        self.assertEqual((yield self.run_action("pid")).result, before.result)

    @inlineCallbacks
    def test_processes_an_action_starts_inherit_action_memory(self):
        self.start(memory=256 << 20)
        self.assertIn("MemoryError", (yield self.run_action("hog_in_a_child", args={"bytes": 512 << 20})).result)


class HealthTests(WorkerTestCase):
    """``health()`` counts the workers that can take a run now."""

    @inlineCallbacks
    def test_worker_being_killed_is_not_counted(self):
        self.start(size=2)
        yield self.pool.when_ready()
        self.assertEqual(self.pool.health()["ready"], 2)
        self.pool.workers[0].kill("protocol")
        health = self.pool.health()
        self.assertEqual((health["ok"], health["workers"], health["ready"]), (True, 1, 1))
        yield self.pool.when_ready()
        self.assertEqual((self.pool.health()["ready"], self.pool.replaced), (2, 1))

    @inlineCallbacks
    def test_stuck_worker_is_not_counted_and_is_replaced_at_its_deadline(self):
        clock = task.Clock()
        self.start(size=2, timeout=10.0, clock=clock)
        yield self.pool.when_ready()
        run, pid = yield self.started("hang")
        stuck = next(w for w in self.pool.workers if w.queue)
        os.kill(stuck.pid, signal.SIGSTOP)  # the warden too: its whole tree is frozen
        os.kill(pid, signal.SIGSTOP)
        self.assertEqual(self.pool.health()["ready"], 2)  # busy, within its time
        clock.advance(10.0)
        health = self.pool.health()
        self.assertEqual((health["ok"], health["workers"], health["ready"]), (True, 1, 1))
        self.assertEqual((yield run).state, "timeout")
        self.assertGone(pid)
        yield self.pool.when_ready()
        self.assertEqual(self.pool.health()["ready"], 2)

    @inlineCallbacks
    def test_worker_gone_while_its_pipes_are_held_open_is_not_counted_and_fails_its_run(self):
        clock = task.Clock()
        self.start(size=1, timeout=10.0, clock=clock)
        run, _ = yield self.started("hang")
        worker = self.pool.workers[0]
        holder = open(f"/proc/{worker.pid}/fd/2", "wb")  # another process holding its stderr pipe
        self.addCleanup(holder.close)
        exited = defer.Deferred()
        process_exited = worker.processExited
        worker.processExited = lambda reason: (process_exited(reason), exited.callback(None))
        os.kill(worker.pid, signal.SIGKILL)
        yield exited
        health = self.pool.health()
        self.assertEqual((health["ok"], health["workers"], health["ready"]), (False, 0, 0))
        self.assertFalse(run.called)
        clock.advance(EXIT_GRACE)
        outcome = yield run
        self.assertEqual(outcome.state, "error")
        self.assertIn("died (signal 9)", outcome.log)
        yield self.pool.when_ready()
        self.assertTrue(self.pool.health()["ok"])

    @inlineCallbacks
    def test_worker_that_cannot_start_makes_the_pool_not_ok_even_while_the_next_starts(self):
        self.patch(workers, "WORKER_ARGS", ("-c", "raise SystemExit(3)"))
        clock = task.Clock()
        self.start(size=1, clock=clock)
        self.assertTrue(self.pool.health()["ok"])  # starting
        yield self.pool.workers[0].ended
        self.assertEqual(self.pool.health()["workers"], 0)
        clock.advance(2.0)  # the next one starts
        health = self.pool.health()
        self.assertEqual((health["ok"], health["workers"], health["ready"]), (False, 1, 0))
        yield self.pool.workers[0].ended
