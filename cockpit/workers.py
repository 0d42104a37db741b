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

Starting, replacing and stopping the workers is :class:`cockpit.processes.ChildPool`'s.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger

from cockpit.process_tree import kill_descendants
from cockpit.processes import EXIT_GRACE, STOP_GRACE, ChildPool, ChildProcess

__all__ = ["EXIT_GRACE", "Job", "Outcome", "WorkerPool", "WorkerPoolStopped", "WorkerProcess"]

log = Logger()

MAX_LINE = 16 * 1024 * 1024  # a longer protocol line means the worker is broken
SLOW_AFTER = 0.5  # seconds: a worker whose current run is older gets no more work while others have room
WORKER_ARGS = ("-m", "cockpit.ays_worker")
ACTION_MEMORY = 1 << 30  # bytes: the default of [ays] action_memory
KILL_GRACE = 2.0  # seconds a warden gets to reap its killed worker and end before it is killed too
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
    deferred: Deferred[Outcome] = field(default_factory=Deferred)
    side_effects: list[Deferred[Any]] = field(default_factory=list)
    on_start: Optional[Callable[[], None]] = None

    @property
    def id(self) -> str:
        return str(self.payload["id"])


class WorkerProcess(ChildProcess):
    """One worker (its warden's process, see :mod:`cockpit.ays_worker`): the jobs it was sent
    (head = the one running)."""

    def __init__(self, pool: "WorkerPool", number: int):
        super().__init__(pool)
        self.pool = pool
        self.number = number
        self.queue: deque[Job] = deque()
        self.buffer = b""
        self.did_work = False
        self._warden_kill: Optional[IDelayedCall] = None

    def kill(self, why: str) -> None:
        """Kill everything below the warden; the warden reaps it and ends (or is killed after KILL_GRACE)."""
        self.killed_for = self.killed_for or why
        if self.exited or self.process.pid is None:
            return
        if not kill_descendants(self.process.pid, freeze_root=True):
            self._signal_root()  # its worker is not there yet (or not any more): nothing to wait for
        elif self._warden_kill is None:
            self._warden_kill = self.clock.callLater(KILL_GRACE, self._kill_warden)

    def _kill_warden(self) -> None:
        self._warden_kill = None
        log.warn("worker {pid} did not end within {grace:g} s of its worker's death; killing it",
                 pid=self.pid, grace=KILL_GRACE)
        self._signal_root()

    def gone(self) -> None:
        if self._warden_kill is not None and self._warden_kill.active():
            self._warden_kill.cancel()
        self._warden_kill = None

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
        if not self.queue:
            self.idle()
            return
        self.working(self.pool.action_timeout)
        head = self.queue[0]
        if head.on_start is not None:
            head.on_start()

    def overran(self) -> None:
        log.warn("action run {id} passed action_timeout ({timeout} s); killing worker {pid}",
                 id=self.queue[0].id, timeout=self.pool.action_timeout, pid=self.pid)

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
            self.became_ready()

    def errReceived(self, data: bytes) -> None:
        text = data.decode(errors="replace").rstrip()
        if text:
            log.warn("worker {pid} wrote on stderr: {text}", pid=self.pid, text=text[:2000])


class WorkerPool(ChildPool[WorkerProcess]):
    """``size`` worker processes; ``submit(payload)`` fires with the run's :class:`Outcome`."""

    child_name = "worker"

    def __init__(self, size: int, action_timeout: float, reactor: IReactorProcess,
                 emit: Optional[Callable[[dict[str, Any]], Deferred[Any]]] = None,
                 send_mail: Optional[Callable[[dict[str, Any]], Deferred[Any]]] = None,
                 batch: int = 32, clock: Optional[IReactorTime] = None, action_memory: int = ACTION_MEMORY):
        # a run that does not finish soon at a stop is killed; it will be redone after a restart
        super().__init__(size, reactor, clock, stop_grace=min(action_timeout, STOP_GRACE))
        self.turns = cast(IReactorTime, reactor)  # the next turn of the reactor, even with a fake clock
        self.action_timeout = action_timeout
        self.action_memory = action_memory
        self.emit = emit
        self.send_mail = send_mail
        self.batch = batch
        self.pending: deque[Job] = deque()
        self._dispatch_call: Optional[IDelayedCall] = None
        self._spawned = 0

    @property
    def workers(self) -> list[WorkerProcess]:
        """The worker processes, the ones starting and the ones being killed too."""
        return self.processes

    # -- lifetime ----------------------------------------------------------
    def new_child(self) -> WorkerProcess:
        self._spawned += 1
        return WorkerProcess(self, self._spawned)

    def child_args(self) -> tuple[str, ...]:
        return (*WORKER_ARGS, str(self.action_memory))

    def stopping(self) -> None:
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        pending, self.pending = list(self.pending), deque()
        for job in pending:
            job.deferred.errback(WorkerPoolStopped("the worker pool stopped before this run started"))

    def usable(self, child: WorkerProcess) -> bool:
        return child.usable(self.clock.seconds())

    def child_ready(self, child: WorkerProcess) -> None:
        self._dispatch_soon()

    def health(self) -> dict[str, Any]:
        """``ready``: workers that can take a run now; ``workers``: those and the ones still starting.

        A worker being killed, stuck past its run's deadline or gone counts in neither. ``ok``
        while one is ready, or while workers start, unless the last one to end never got ready.
        """
        now = self.clock.seconds()
        ready = sum(1 for w in self.workers if w.usable(now))
        starting = sum(1 for w in self.workers if w.starting(now))
        return {"ok": self.running and (ready > 0 or (starting > 0 and not self.failed_starts)),
                "workers": ready + starting, "ready": ready, "queued": len(self.pending),
                "running": sum(len(w.queue) for w in self.workers), "replaced": self.replaced}

    # -- jobs --------------------------------------------------------------
    def submit(self, payload: dict[str, Any], on_start: Optional[Callable[[], None]] = None) -> Deferred[Outcome]:
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
            self._dispatch_call = self.turns.callLater(0, self._dispatch)

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

    def child_ended(self, worker: WorkerProcess, code: Optional[int], signal: Optional[int]) -> None:
        jobs = list(worker.queue)
        worker.queue.clear()
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
