"""The lifetime that both child-process pools share: :class:`ChildPool` and its :class:`ChildProcess`.

A pool keeps ``size`` long-lived ``python`` children running (the action workers of
:mod:`cockpit.workers`, the mail parsers of :mod:`cockpit.parse_pool`):

- a child is *ready* once it says so on its protocol; :meth:`ChildPool.when_ready` fires
  once ``size`` of them are;
- a child that ended is replaced: at once if it had been ready, after ``RESPAWN_DELAY``
  if it ended before it was ready (starting another at once would only spin);
- a child whose current job passes its deadline is killed (``killed_for == "timeout"``),
  with every process below it; what that means for the job is the pool's;
- its death is seen when its process exits, even if something it started still holds its
  pipes (they are closed ``EXIT_GRACE`` later);
- at a stop, a ready child gets its stdin closed and ``stop_grace`` seconds to end, then it
  is killed with every process below it; one not ready yet is killed at once. The stop
  fires once every child has ended, which the kill bounds.

Every time comes from the pool's ``clock``. A pool keeps what is its own: the protocol,
its jobs, what a timeout or a death means for a job, and its health.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, ClassVar, Generic, Optional, Sequence, TypeVar, cast

from twisted.application.service import Service
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import cockpit
from cockpit.process_tree import kill_descendants

log = Logger()

RESPAWN_DELAY = 2.0  # seconds before a child that ended before it was ready is replaced
EXIT_GRACE = 1.0  # seconds after a child exited that its pipes may stay open (to read what it wrote last)
STOP_GRACE = 5.0  # seconds a ready child gets to end at a stop before it is killed

# Twisted's Service is not typed: its two methods, as what they are
_start_service: Callable[[Service], None] = Service.startService
_stop_service: Callable[[Service], None] = Service.stopService


def spawn_python(reactor: IReactorProcess, child: protocol.ProcessProtocol, args: Sequence[str]) -> None:
    """Run ``python <args>`` with the cockpit package this process runs, wherever it came from.

    Its stdin, stdout and stderr are pipes to ``child``.
    """
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cockpit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    reactor.spawnProcess(child, sys.executable, [sys.executable, *args], env=env,
                         childFDs={0: "w", 1: "r", 2: "r"})


class ChildProcess(protocol.ProcessProtocol):
    """One child of a :class:`ChildPool`: its pid, whether it is ready, why we killed it, and when it ended.

    A subclass speaks the protocol: it calls :meth:`became_ready` when the child says it is,
    and :meth:`working`/:meth:`idle` as the job at the head of its queue changes.
    """

    def __init__(self, pool: ChildPool[Any]) -> None:
        self._pool = pool
        self.clock = pool.clock
        self.pid: Optional[int] = None
        self.ready = False
        self.exited = False  # its process is gone (its pipes may not be closed yet)
        self.killed_for: Optional[str] = None  # "timeout", "protocol" or "stopping" once we killed it
        self.spawned_at = self.clock.seconds()
        self.head_since = 0.0  # when its current job became the one it works on
        self.ended: Deferred[None] = Deferred()
        self._deadline: Optional[IDelayedCall] = None
        self._close_pipes: Optional[IDelayedCall] = None

    @property
    def process(self) -> IProcessTransport:
        """The process's transport, set when it is spawned: before anything below is called."""
        assert self.transport is not None, "the process is not spawned"
        return self.transport

    def kill(self, why: str) -> None:
        """SIGKILL the process and everything below it (frozen first, so that nothing forks away)."""
        self.killed_for = self.killed_for or why
        if self.exited:
            return
        if self.process.pid is not None:
            kill_descendants(self.process.pid, freeze_root=True)
        self._signal_root()

    def _signal_root(self) -> None:
        try:
            self.process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def became_ready(self) -> None:
        """The child said it is ready to take work."""
        self.ready = True
        self._pool._child_ready(self)

    def working(self, timeout: float) -> None:
        """A job becomes its current one now; past ``timeout`` seconds the child is killed for it."""
        self.idle()
        self.head_since = self.clock.seconds()
        self._deadline = self.clock.callLater(timeout, self._past_deadline)

    def idle(self) -> None:
        """It has no current job: no deadline runs."""
        _cancel(self._deadline)
        self._deadline = None

    def overran(self) -> None:
        """Its current job passed its deadline; it is killed next. A subclass says so in the log."""

    def _past_deadline(self) -> None:
        self._deadline = None
        if self.killed_for is None and not self.exited:
            self.overran()
            self.kill("timeout")

    def gone(self) -> None:
        """Its process exited: a subclass cancels the timers it keeps."""

    # -- ProcessProtocol -----------------------------------------------------
    def connectionMade(self) -> None:
        self.pid = self.process.pid

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self.idle()
        self.gone()
        # what it wrote before it exited is still to be read; a pipe held open past that is
        # held by something that escaped its tree, and must not keep it from ending
        self._close_pipes = self.clock.callLater(EXIT_GRACE, self._lose_pipes)

    def _lose_pipes(self) -> None:
        self._close_pipes = None
        log.warn("{child} {pid} exited, but a process it started still holds its pipes; closing them",
                 child=self._pool.child_name, pid=self.pid)
        self.process.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        self.idle()
        self.gone()
        _cancel(self._close_pipes)
        self._close_pipes = None
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self._pool._child_ended(self, code, signal)
        self.ended.callback(None)


def _cancel(call: Optional[IDelayedCall]) -> None:
    if call is not None and call.active():
        call.cancel()


C = TypeVar("C", bound=ChildProcess)


class ChildPool(Service, Generic[C]):
    """``size`` children of type ``C``, spawned by ``reactor``, kept running while the service runs.

    A subclass says what a child is (:meth:`new_child`, :meth:`child_args`) and what becomes
    of its work (:meth:`child_ready`, :meth:`child_ended`, :meth:`stopping`).
    """

    child_name: ClassVar[str] = "child process"  # how the log names one

    def __init__(self, size: int, reactor: IReactorProcess, clock: Optional[IReactorTime] = None,
                 stop_grace: float = STOP_GRACE) -> None:
        self.size = size
        self.reactor = reactor
        # the reactor tells the time too; the interfaces do not say so
        self.clock: IReactorTime = clock if clock is not None else cast(IReactorTime, reactor)
        self.stop_grace = stop_grace
        self.processes: list[C] = []
        self.replaced = 0  # children that ended while the pool ran
        self.failed_starts = 0  # children in a row that ended before they were ready
        self._respawns: list[IDelayedCall] = []
        self._ready_waiters: list[Deferred[None]] = []

    # -- what a subclass says ------------------------------------------------
    def new_child(self) -> C:
        """A new child's protocol, not spawned yet."""
        raise NotImplementedError

    def child_args(self) -> Sequence[str]:
        """The arguments after ``python`` that run a child."""
        raise NotImplementedError

    def child_ready(self, child: C) -> None:
        """``child`` became ready (before the waiters of :meth:`when_ready` hear of it)."""

    def child_ended(self, child: C, code: Optional[int], signal: Optional[int]) -> None:
        """``child`` ended and was taken out (and replaced, while running): settle what it had."""

    def stopping(self) -> None:
        """The pool stops: called before its children are told to end."""

    def usable(self, child: C) -> bool:
        """Whether ``child`` can take work now."""
        return child.ready and child.killed_for is None and not child.exited

    # -- lifetime ------------------------------------------------------------
    def startService(self) -> None:
        _start_service(self)
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> C:
        child = self.new_child()
        spawn_python(self.reactor, child, self.child_args())
        self.processes.append(child)
        return child

    def stopService(self) -> Deferred[None]:
        """Fires once every child has ended (see the module's docstring for how long that takes)."""
        _stop_service(self)
        for call in self._respawns:
            _cancel(call)
        self._respawns = []
        self.stopping()
        ended = [child.ended for child in self.processes]
        kills: list[IDelayedCall] = []
        for child in list(self.processes):
            if child.ready and not child.exited:
                child.process.closeStdin()  # it ends once it has done what it has
                kills.append(self.clock.callLater(self.stop_grace, child.kill, "stopping"))
            else:
                child.kill("stopping")

        def stopped(_: object) -> None:
            for call in kills:
                _cancel(call)
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        return DeferredList(ended).addCallback(stopped)

    def ready_count(self) -> int:
        return sum(1 for child in self.processes if self.usable(child))

    def when_ready(self) -> Deferred[None]:
        """Fires once ``size`` children can take work (or the pool stopped)."""
        d: Deferred[None] = Deferred()
        if not self.running or self.ready_count() >= self.size:
            d.callback(None)
        else:
            self._ready_waiters.append(d)
        return d

    def _child_ready(self, child: C) -> None:
        self.failed_starts = 0
        self.child_ready(child)
        if self._ready_waiters and self.ready_count() >= self.size:
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _child_ended(self, child: C, code: Optional[int], signal: Optional[int]) -> None:
        self.processes.remove(child)
        if self.running:
            # the replacement first: whoever hears of its work finds the pool whole again
            self.replaced += 1
            if not child.ready:  # it never got going: starting another at once would only spin
                self.failed_starts += 1
                log.error("{child} {pid} ended before it was ready (code {code}); starting another in {delay:g} s",
                          child=self.child_name, pid=child.pid, code=code, delay=RESPAWN_DELAY)
                self._respawns.append(self.clock.callLater(RESPAWN_DELAY, self._respawn))
            else:
                self._spawn()
        self.child_ended(child, code, signal)

    def _respawn(self) -> None:
        self._respawns = [call for call in self._respawns if call.active()]
        if self.running:
            self._spawn()
