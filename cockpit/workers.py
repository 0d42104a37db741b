"""The action worker pool: long-lived ``python -m cockpit.ays_worker`` processes.

Action code never runs in the cockpit's process. :meth:`WorkerPool.submit` queues a
job and fires with its :class:`Outcome`; queued jobs go to the least busy worker in
batches (one message carries several runs), and each worker runs its batch in order.

- An action that raises: the worker reports ``error`` with the traceback.
- An action still running after ``action_timeout``: its worker is killed and replaced;
  the run is ``timeout``. Runs queued behind it on that worker go to another one.
- A worker that dies: its current run is ``error``; the others are requeued; a new
  worker takes its place.
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
from twisted.logger import Logger
from twisted.python.failure import Failure

import cockpit

log = Logger()

MAX_LINE = 16 * 1024 * 1024  # a longer protocol line means the worker is broken
SLOW_AFTER = 0.5  # seconds: a worker whose current run is older gets no more work while others have room
WORKER_ARGS = ("-m", "cockpit.ays_worker")


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

    def kill(self, why: str) -> None:
        self.killed_for = self.killed_for or why
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def connectionMade(self) -> None:
        self.pid = self.transport.pid


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
    """One worker: the jobs it was sent (head = the one running) and their timer."""

    def __init__(self, pool: "WorkerPool", number: int):
        super().__init__()
        self.pool = pool
        self.number = number
        self.queue: deque[Job] = deque()
        self.buffer = b""
        self.ready = False
        self.head_since = 0.0
        self.timer: Any = None
        self.did_work = False

    # -- talking -----------------------------------------------------------
    def send(self, jobs: list[Job]) -> None:
        was_idle = not self.queue
        self.queue.extend(jobs)
        self.transport.write(json.dumps({"runs": [job.payload for job in jobs]}, default=str).encode() + b"\n")
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
            job = self.queue[0] if self.queue and self.queue[0].id == message.get("id") else None
            if job is None:
                log.warn("worker {pid} sent {op} for run {id}, which is not running", pid=self.pid, op=op,
                         id=message.get("id"))
                return
            self.pool._side_effect(job, op, message.get("event") if op == "emit" else message.get("mail"))
        elif op == "ready":
            self.ready = True
            self.pool._dispatch_soon()

    def errReceived(self, data: bytes) -> None:
        text = data.decode(errors="replace").rstrip()
        if text:
            log.warn("worker {pid} wrote on stderr: {text}", pid=self.pid, text=text[:2000])

    def processEnded(self, reason: Failure) -> None:
        self._cancel_timer()
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.pool._ended(self, code, signal)
        self.ended.callback(None)


class WorkerPool(Service):
    """``size`` worker processes; ``submit(payload)`` fires with the run's :class:`Outcome`."""

    def __init__(self, size: int = 4, action_timeout: float = 300.0, reactor: Any = None,
                 emit: Optional[Callable[[dict[str, Any]], Deferred]] = None,
                 send_mail: Optional[Callable[[dict[str, Any]], Deferred]] = None,
                 batch: int = 32, clock: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock = clock or reactor
        self.size = size
        self.action_timeout = action_timeout
        self.emit = emit
        self.send_mail = send_mail
        self.batch = batch
        self.workers: list[WorkerProcess] = []
        self.pending: deque[Job] = deque()
        self._dispatch_call: Any = None
        self._respawns: list[Any] = []
        self._spawned = 0
        self.replaced = 0

    # -- lifetime ----------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> WorkerProcess:
        self._spawned += 1
        worker = WorkerProcess(self, self._spawned)
        spawn_python(self.reactor, worker, WORKER_ARGS)
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

    def health(self) -> dict[str, Any]:
        return {"ok": self.running and any(w.ready for w in self.workers), "workers": len(self.workers),
                "ready": sum(1 for w in self.workers if w.ready), "queued": len(self.pending),
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
            room = [w for w in self.workers if w.ready and w.killed_for is None and len(w.queue) < self.batch
                    and (not w.queue or now - w.head_since < SLOW_AFTER)]
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
        if jobs:
            head, rest = jobs[0], jobs[1:]
            if worker.killed_for == "timeout":
                outcome = Outcome("timeout", f"the action ran past action_timeout ({self.action_timeout:g} s) "
                                  "and was killed; its worker was replaced\n", None, None, None)
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
                self._finished(head, outcome)
                # they never started: another worker takes them, in order
                self.pending.extendleft(reversed(rest))
        if not self.running:
            return
        self.replaced += 1
        if not worker.ready:  # it never got going: starting another at once would only spin
            log.error("worker {pid} ended right after it started (code {code}); starting another in 2 s",
                      pid=worker.pid, code=code)
            call = self.clock.callLater(2.0, self._respawn)
            self._respawns.append(call)
        else:
            self._spawn()
        self._dispatch_soon()

    def _respawn(self) -> None:
        self._respawns = [c for c in self._respawns if c.active()]
        if self.running:
            self._spawn()
            self._dispatch_soon()
