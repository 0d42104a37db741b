"""The lifetime both child-process pools share, with tiny real children."""
from __future__ import annotations

import os
import signal
import textwrap
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit.processes import RESPAWN_DELAY, STOP_GRACE, ChildPool, ChildProcess

PF_EXITING = 0x4  # /proc/<pid>/stat flags: the process is exiting (it closed its files before it is a zombie)
SAYS_READY_AND_WAITS = "import signal; print('ready', flush=True); signal.pause()"
ENDS_AT_ONCE = "raise SystemExit(3)"
NEVER_READY = "import signal; signal.pause()"
ENDS_WITH_ITS_STDIN = "import sys; print('ready', flush=True); sys.stdin.read()"
STARTS_A_GRANDCHILD = textwrap.dedent("""
    import signal, subprocess, sys
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    print("ready", grandchild.pid, flush=True)
    signal.pause()
""")


class Child(ChildProcess):
    """Ready once it wrote a line."""

    def __init__(self, pool: "Pool"):
        super().__init__(pool)
        self.said = b""

    def outReceived(self, data: bytes) -> None:
        self.said += data
        if not self.ready and b"\n" in self.said:
            self.became_ready()


class Pool(ChildPool[Child]):
    child_name = "test child"

    def __init__(self, program: str, size: int, clock: Clock):
        super().__init__(size, reactor, clock)
        self.program = program
        self.ended: list[tuple[Child, Optional[int], Optional[int]]] = []

    def new_child(self) -> Child:
        return Child(self)

    def child_args(self) -> tuple[str, ...]:
        return ("-c", self.program)

    def child_ended(self, child: Child, code: Optional[int], signal: Optional[int]) -> None:
        self.ended.append((child, code, signal))


class ChildPoolTests(TestCase):
    timeout = 30

    def start(self, program: str, size: int = 1) -> tuple[Pool, Clock]:
        clock = Clock()
        pool = Pool(program, size, clock)
        pool.startService()

        def stop():
            if pool.running:
                d = pool.stopService()
                clock.advance(3600)  # past the grace a child gets at a stop
                return d
        self.addCleanup(stop)
        return pool, clock

    def assertDead(self, pid: int) -> None:
        """Gone, or on its way out: still exiting, or a zombie that whoever inherited it has not reaped yet."""
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
        except FileNotFoundError:
            return
        fields = stat[stat.rfind(")") + 2:].split()
        state, flags = fields[0], int(fields[6])
        self.assertTrue(state in "ZX" or flags & PF_EXITING, stat)

    @inlineCallbacks
    def test_a_child_that_dies_after_it_was_ready_is_replaced_at_once(self):
        pool, _ = self.start(SAYS_READY_AND_WAITS, size=2)
        yield pool.when_ready()
        self.assertEqual(2, pool.ready_count())
        first = pool.processes[0]
        os.kill(first.pid, signal.SIGKILL)
        yield first.ended
        self.assertEqual([(first, None, signal.SIGKILL)], pool.ended)
        self.assertEqual((1, 0), (pool.replaced, pool.failed_starts))
        self.assertEqual(2, len(pool.processes))
        self.assertNotIn(first, pool.processes)
        yield pool.when_ready()
        self.assertEqual(2, pool.ready_count())

    @inlineCallbacks
    def test_a_child_that_keeps_ending_before_it_is_ready_is_replaced_only_after_the_delay(self):
        pool, clock = self.start(ENDS_AT_ONCE)
        for attempt in (1, 2, 3):
            child = pool.processes[0]
            yield child.ended
            self.assertEqual((child, 3, None), pool.ended[-1])
            self.assertEqual(([], attempt, attempt), (pool.processes, pool.failed_starts, pool.replaced))
            clock.advance(RESPAWN_DELAY / 2)
            self.assertEqual([], pool.processes)
            clock.advance(RESPAWN_DELAY / 2)
            self.assertEqual(1, len(pool.processes))
        pool.program = SAYS_READY_AND_WAITS  # the next one gets going
        yield pool.processes[0].ended
        clock.advance(RESPAWN_DELAY)
        yield pool.when_ready()
        self.assertEqual((1, 0, 4), (pool.ready_count(), pool.failed_starts, pool.replaced))

    @inlineCallbacks
    def test_stop_kills_a_child_that_does_not_end_and_the_process_it_started(self):
        pool, clock = self.start(STARTS_A_GRANDCHILD)
        yield pool.when_ready()
        [child] = pool.processes
        grandchild = int(child.said.split()[1])
        os.kill(grandchild, 0)  # alive
        stopped = pool.stopService()  # its stdin is closed; it does not care
        clock.advance(STOP_GRACE / 2)
        self.assertFalse(stopped.called)
        self.assertIsNone(child.killed_for)
        clock.advance(STOP_GRACE / 2)
        yield stopped  # once its pipes are closed: by the grandchild too
        self.assertEqual("stopping", child.killed_for)
        self.assertDead(grandchild)
        self.assertDead(child.pid)
        self.assertEqual(([], 0), (pool.processes, pool.replaced))

    @inlineCallbacks
    def test_stop_lets_a_ready_child_end_by_itself_when_its_stdin_closes(self):
        pool, _ = self.start(ENDS_WITH_ITS_STDIN)
        yield pool.when_ready()
        [child] = pool.processes
        yield pool.stopService()  # no grace passed
        self.assertEqual([(child, 0, None)], pool.ended)
        self.assertIsNone(child.killed_for)

    @inlineCallbacks
    def test_stop_kills_a_child_not_ready_yet_at_once_and_answers_the_ready_waiters(self):
        pool, _ = self.start(NEVER_READY)
        waiter = pool.when_ready()
        self.assertFalse(waiter.called)
        [child] = pool.processes
        yield pool.stopService()  # no grace passed
        self.assertEqual(([(child, None, signal.SIGKILL)], "stopping"), (pool.ended, child.killed_for))
        self.assertTrue(waiter.called)
        self.assertEqual([], pool.processes)

    @inlineCallbacks
    def test_a_child_past_its_deadline_is_killed_and_replaced_and_one_gone_idle_is_not(self):
        pool, clock = self.start(SAYS_READY_AND_WAITS, size=2)
        yield pool.when_ready()
        late, done = pool.processes
        late.working(10.0)
        done.working(10.0)
        clock.advance(5.0)
        done.idle()
        clock.advance(4.9)
        self.assertIsNone(late.killed_for)
        clock.advance(0.1)
        self.assertEqual(("timeout", None), (late.killed_for, done.killed_for))
        self.assertEqual(1, pool.ready_count())  # being killed: it takes no more work
        yield late.ended
        clock.advance(3600)
        self.assertIsNone(done.killed_for)
        self.assertEqual(1, pool.replaced)
        yield pool.when_ready()
        self.assertEqual(2, pool.ready_count())
