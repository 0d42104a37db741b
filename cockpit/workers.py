"""The action worker pool: long-lived ``python -m cockpit.ays_worker`` processes.

Action code never runs in the cockpit's process. :meth:`WorkerPool.submit` queues a
job and fires with its :class:`Outcome`; queued jobs go to the least busy worker in
batches (one message carries several runs), and each worker runs its batch in order.

- An action that raises: the worker reports ``error`` with the traceback.
- An action still running after ``action_timeout``: its worker is killed with every
  process below it, and replaced; the run is ``timeout``. Runs queued behind it on that
  worker go to another one.
- A worker that dies: its current run is ``error``; the others are requeued; a new
  worker takes its place. Its death is seen when its process exits, even if something it
  started still held its pipes.
- What an action starts does not outlive its run (see :mod:`cockpit.ays_worker`), and a
  worker's data segment is capped at ``action_memory`` bytes.
- ``service.emit()`` and ``service.send_mail()`` come back over the pipe; the pool hands
  them to its ``emit``/``send_mail`` callables, and a run is complete only when those
  have succeeded (a failure makes the run ``error``).
"""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

import cockpit
from cockpit.process_tree import kill_descendants

log = Logger()

MAX_LINE = 16 * 1024 * 1024  # a longer protocol line means the worker is broken
SLOW_AFTER = 0.5  # seconds: a worker whose current run is older gets no more work while others have room
WORKER_ARGS = ("-m", "cockpit.ays_worker")
ACTION_MEMORY = 1 << 30  # bytes: the default of [ays] action_memory
KILL_GRACE = 2.0  # seconds a warden gets to reap its killed worker and end before it is killed too
EXIT_GRACE = 1.0  # seconds after a worker exited that its pipes may stay open (to read what it wrote last)
START_GRACE = 30.0  # seconds a new worker may take to be ready before health stops counting it


class WorkerPoolStopped(Exception):
    """The pool stopped before the job ran; it was not run."""


@dataclass
class Outcome:
    """How a run ended."""

    state: str  # ok, error or timeout
    log: str = ""
    result: Any = None
    started: Optional[float] = None
    ended: Optional[float] = None


@dataclass
class Job:
    """One run to do: ``payload`` is what the worker gets (id, path, action, service, event)."""

    payload: dict[str, Any]
    deferred: Deferred = field(default_factory=Deferred)
    side_effects: list[Deferred] = field(default_factory=list)
    on_start: Optional[Callable[[], None]] = None

    @property
    def id(self) -> str:
        return self.payload["id"]


class ChildProcess(protocol.ProcessProtocol):
    """A long-lived helper process of the cockpit's: its pid, why we killed it, and when it ended."""

    def __init__(self) -> None:
        self.pid: Optional[int] = None
        self.killed_for: Optional[str] = None  # "timeout", "protocol" or "stopping" once we killed it
        self.ended: Deferred = Deferred()

    @property
    def process(self) -> IProcessTransport:
        """The process's transport, set when it is spawned: before anything below is called."""
        assert self.transport is not None, "the process is not spawned"
        return self.transport

    def kill(self, why: str) -> None:
        """SIGKILL the process and everything below it (frozen first, so that nothing forks away)."""
        self.killed_for = self.killed_for or why
        if self.process.pid is not None:
            kill_descendants(self.process.pid, freeze_root=True)
        self._signal_root()

    def _signal_root(self) -> None:
        try:
            self.process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def connectionMade(self) -> None:
        self.pid = self.process.pid


def spawn_python(reactor: Any, child: ChildProcess, args: Sequence[str]) -> None:
    """Run ``python <args>`` with the cockpit package this process runs, wherever it came from.

    Its stdin, stdout and stderr are pipes to ``child``.
    """
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cockpit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    reactor.spawnProcess(child, sys.executable, [sys.executable, *args], env=env,
                         childFDs={0: "w", 1: "r", 2: "r"})


class WorkerProcess(ChildProcess):
    """One worker (its warden's process, see :mod:`cockpit.ays_worker`): the jobs it was sent
    (head = the one running) and their timer."""

    def __init__(self, pool: "WorkerPool", number: int):
        super().__init__()
        self.pool = pool
        self.number = number
        self.queue: deque[Job] = deque()
        self.buffer = b""
        self.ready = False
        self.exited = False  # its process is gone (its pipes may not be closed yet)
        self.spawned_at = pool.clock.seconds()
        self.head_since = 0.0
        self.timer: Any = None
        self.did_work = False
        self._warden_kill: Any = None
        self._close_pipes: Any = None

    def kill(self, why: str) -> None:
        """Kill everything below the warden; the warden reaps it and ends (or is killed after KILL_GRACE)."""
        self.killed_for = self.killed_for or why
        if self.exited or self.process.pid is None:
            return
        if not kill_descendants(self.process.pid, freeze_root=True):
            self._signal_root()  # its worker is not there yet (or not any more): nothing to wait for
        elif self._warden_kill is None:
            self._warden_kill = self.pool.clock.callLater(KILL_GRACE, self._kill_warden)

    def _kill_warden(self) -> None:
        self._warden_kill = None
        log.warn("worker {pid} did not end within {grace:g} s of its worker's death; killing it",
                 pid=self.pid, grace=KILL_GRACE)
        self._signal_root()

    def _cancel(self, call: Any) -> None:
        if call is not None and call.active():
            call.cancel()

    def usable(self, now: float) -> bool:
        """Alive, not being killed, and not stuck: it said it is ready, and its run is within its time."""
        return (self.ready and self.killed_for is None and not self.exited
                and not (self.queue and now - self.head_since > self.pool.action_timeout))

    def starting(self, now: float) -> bool:
        return (not self.ready and self.killed_for is None and not self.exited
                and now - self.spawned_at <= START_GRACE)

    # -- talking -----------------------------------------------------------
    def send(self, jobs: list[Job]) -> None:
        was_idle = not self.queue
        self.queue.extend(jobs)
        self.process.write(json.dumps({"runs": [job.payload for job in jobs]}, default=str).encode() + b"\n")
        if was_idle:
            self._head_started()

    def _head_started(self) -> None:
        self._cancel_timer()
        if not self.queue:
            return
        self.head_since = self.pool.clock.seconds()
        head = self.queue[0]
        if head.on_start is not None:
            head.on_start()
        self.timer = self.pool.clock.callLater(self.pool.action_timeout, self._timed_out, head)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self, job: Job) -> None:
        self.timer = None
        if self.queue and self.queue[0] is job:
            log.warn("action run {id} passed action_timeout ({timeout} s); killing worker {pid}",
                     id=job.id, timeout=self.pool.action_timeout, pid=self.pid)
            self.kill("timeout")

    # -- ProcessProtocol -----------------------------------------------------
    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in data:
            if len(self.buffer) > MAX_LINE:
                log.error("worker {pid} sent a protocol line over {max} bytes; killing it", pid=self.pid, max=MAX_LINE)
                self.kill("protocol")
            return
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line:
                try:
                    message = json.loads(line)
                except ValueError:
                    log.error("worker {pid} broke the protocol: {line!r}; killing it", pid=self.pid, line=line[:200])
                    self.kill("protocol")
                    return
                self._message(message)

    def _message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "done":
            if not self.queue or self.queue[0].id != message.get("id"):
                log.error("worker {pid} finished run {id}, which is not its current one", pid=self.pid,
                          id=message.get("id"))
                self.kill("protocol")
                return
            job = self.queue.popleft()
            self.did_work = True
            self._head_started()
            self.pool._finished(job, Outcome(message.get("state", "error"), message.get("log", ""),
                                             message.get("result"), message.get("started"), message.get("ended")))
            self.pool._dispatch_soon()
        elif op in ("emit", "mail"):
            running = self.queue[0] if self.queue and self.queue[0].id == message.get("id") else None
            if running is None:
                log.warn("worker {pid} sent {op} for run {id}, which is not running", pid=self.pid, op=op,
                         id=message.get("id"))
                return
            self.pool._side_effect(running, op, message.get("event") if op == "emit" else message.get("mail"))
        elif op == "ready":
            self.ready = True
            self.pool._became_ready()

    def errReceived(self, data: bytes) -> None:
        text = data.decode(errors="replace").rstrip()
        if text:
            log.warn("worker {pid} wrote on stderr: {text}", pid=self.pid, text=text[:2000])

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self._cancel_timer()
        self._cancel(self._warden_kill)
        self._warden_kill = None
        # what it wrote before it exited is still to be read; a pipe held open past that is
        # held by something that escaped its tree, and must not keep its runs open
        self._close_pipes = self.pool.clock.callLater(EXIT_GRACE, self._lose_pipes)

    def _lose_pipes(self) -> None:
        self._close_pipes = None
        log.warn("worker {pid} exited, but a process it started still holds its pipes; closing them",
                 pid=self.pid)
        self.process.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self._cancel_timer()
        self._cancel(self._warden_kill)
        self._cancel(self._close_pipes)
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.pool._ended(self, code, signal)
        self.ended.callback(None)


class WorkerPool(Service):
    """``size`` worker processes; ``submit(payload)`` fires with the run's :class:`Outcome`."""

    def __init__(self, size: int = 4, action_timeout: float = 300.0, reactor: Any = None,
                 emit: Optional[Callable[[dict[str, Any]], Deferred]] = None,
                 send_mail: Optional[Callable[[dict[str, Any]], Deferred]] = None,
                 batch: int = 32, clock: Any = None, action_memory: int = ACTION_MEMORY):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock = clock or reactor
        self.size = size
        self.action_timeout = action_timeout
        self.action_memory = action_memory
        self.emit = emit
        self.send_mail = send_mail
        self.batch = batch
        self.workers: list[WorkerProcess] = []
        self.pending: deque[Job] = deque()
        self._dispatch_call: Any = None
        self._respawns: list[Any] = []
        self._spawned = 0
        self._failed_starts = 0  # workers in a row that ended before they were ready
        self._ready_waiters: list[Deferred] = []
        self.replaced = 0

    # -- lifetime ----------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> WorkerProcess:
        self._spawned += 1
        worker = WorkerProcess(self, self._spawned)
        spawn_python(self.reactor, worker, (*WORKER_ARGS, str(self.action_memory)))
        self.workers.append(worker)
        return worker

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        for call in self._respawns:
            if call.active():
                call.cancel()
        self._respawns = []
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        pending, self.pending = list(self.pending), deque()
        for job in pending:
            job.deferred.errback(WorkerPoolStopped("the worker pool stopped before this run started"))
        ended = [worker.ended for worker in self.workers]
        kills = []
        for worker in list(self.workers):
            worker.transport.closeStdin()  # a worker ends after its current batch
            # a run that does not finish soon is killed; it will be redone after a restart
            kills.append(self.clock.callLater(min(self.action_timeout, 5.0), worker.kill, "stopping"))
        yield defer.DeferredList(ended)
        for call in kills:
            if call.active():
                call.cancel()
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_ready(self) -> Deferred:
        """Fires once ``size`` workers are ready to take runs (or the pool stopped)."""
        if not self.running or self._ready_count() >= self.size:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._ready_waiters.append(d)
        return d

    def _ready_count(self) -> int:
        now = self.clock.seconds()
        return sum(1 for w in self.workers if w.usable(now))

    def _became_ready(self) -> None:
        self._failed_starts = 0
        if self._ready_waiters and self._ready_count() >= self.size:
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._dispatch_soon()

    def health(self) -> dict[str, Any]:
        """``ready``: workers that can take a run now; ``workers``: those and the ones still starting.

        A worker being killed, stuck past its run's deadline or gone counts in neither. ``ok``
        while one is ready, or while workers start, unless the last one to end never got ready.
        """
        now = self.clock.seconds()
        ready = sum(1 for w in self.workers if w.usable(now))
        starting = sum(1 for w in self.workers if w.starting(now))
        return {"ok": self.running and (ready > 0 or (starting > 0 and not self._failed_starts)),
                "workers": ready + starting, "ready": ready, "queued": len(self.pending),
                "running": sum(len(w.queue) for w in self.workers), "replaced": self.replaced}

    # -- jobs --------------------------------------------------------------
    def submit(self, payload: dict[str, Any], on_start: Optional[Callable[[], None]] = None) -> Deferred:
        """Queue a job (``payload`` has id, path, action, service, event); fires with its Outcome."""
        if not self.running:
            return defer.fail(WorkerPoolStopped("the worker pool is not running"))
        job = Job(payload, on_start=on_start)
        self.pending.append(job)
        self._dispatch_soon()
        return job.deferred

    def _dispatch_soon(self) -> None:
        # once per reactor turn, so that jobs submitted together travel together
        if self._dispatch_call is None and self.pending and self.running:
            self._dispatch_call = self.reactor.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_call = None
        now = self.clock.seconds()
        while self.pending:
            room = [w for w in self.workers if w.ready and w.killed_for is None and not w.exited
                    and len(w.queue) < self.batch and (not w.queue or now - w.head_since < SLOW_AFTER)]
            if not room:
                return
            worker = min(room, key=lambda w: len(w.queue))
            share = max(1, -(-len(self.pending) // len(room)))
            take = min(self.batch - len(worker.queue), share, len(self.pending))
            worker.send([self.pending.popleft() for _ in range(take)])

    def _side_effect(self, job: Job, op: str, data: Any) -> None:
        target = self.emit if op == "emit" else self.send_mail
        if target is None:
            d = defer.fail(RuntimeError("sending mail is not configured ([mail.relay])" if op == "mail"
                                        else "this cockpit cannot publish events"))
        else:
            d = defer.maybeDeferred(target, data)
        job.side_effects.append(d)

    def _finished(self, job: Job, outcome: Outcome) -> None:
        if not job.side_effects:
            job.deferred.callback(outcome)
            return

        def settle(results: list[tuple[bool, Any]]) -> Outcome:
            failures = [value for ok, value in results if not ok]
            for failure in failures:
                outcome.state = "error"
                outcome.log += f"\nan event or mail from this run could not be sent: {failure.getErrorMessage()}\n"
            return outcome

        defer.DeferredList(job.side_effects, consumeErrors=True).addCallback(settle).chainDeferred(job.deferred)

    def _ended(self, worker: WorkerProcess, code: Optional[int], signal: Optional[int]) -> None:
        self.workers.remove(worker)
        jobs = list(worker.queue)
        worker.queue.clear()
        if self.running:
            # the replacement first: whoever hears of these runs finds the pool whole again
            self.replaced += 1
            if not worker.ready:  # it never got going: starting another at once would only spin
                self._failed_starts += 1
                log.error("worker {pid} ended right after it started (code {code}); starting another in 2 s",
                          pid=worker.pid, code=code)
                self._respawns.append(self.clock.callLater(2.0, self._respawn))
            else:
                self._spawn()
        if jobs:
            head, rest = jobs[0], jobs[1:]
            if worker.killed_for == "timeout":
                outcome = Outcome("timeout", f"the action ran past action_timeout ({self.action_timeout:g} s) "
                                  "and was killed with every process it started; its worker was replaced\n",
                                  None, None, None)
            elif worker.killed_for == "stopping":
                outcome = None
            else:
                how = f"exit code {code}" if code is not None else f"signal {signal}"
                outcome = Outcome("error", f"the worker process running this action died ({how}); "
                                  "it was replaced\n")
            if outcome is None:
                for job in jobs:
                    job.deferred.errback(WorkerPoolStopped("the cockpit stopped while this run was going"))
            else:
                # they never started: another worker takes them, in order
                self.pending.extendleft(reversed(rest))
                self._finished(head, outcome)
        self._dispatch_soon()

    def _respawn(self) -> None:
        self._respawns = [c for c in self._respawns if c.active()]
        if self.running:
            self._spawn()
            self._dispatch_soon()
