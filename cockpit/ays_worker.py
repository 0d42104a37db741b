"""An action worker process: ``python -m cockpit.ays_worker``.

The protocol is one JSON object a line. The parent writes batches of runs to stdin::

    {"runs": [{"id", "path", "action", "service": {...}, "event": {...} | null}, ...]}

and this process runs them one after the other, answering on its stdout (kept for the
protocol alone: fd 1 is pointed at stderr, so stray output cannot corrupt it)::

    {"op": "ready", "pid": 123}
    {"op": "emit", "id": run_id, "event": {...}}     # service.emit(type, **fields)
    {"op": "mail", "id": run_id, "mail": {...}}      # service.send_mail(...)
    {"op": "done", "id": run_id, "state": "ok" | "error", "log": "...", "result": ...,
     "started": epoch, "ended": epoch}

Print output, ``service.log()`` and tracebacks go to the run's log, bounded in size.
``actions.py`` files are loaded once per (path, mtime).

``python -m cockpit.ays_worker [ACTION_MEMORY]`` is two processes. The one the cockpit
started is the *warden*: it runs no action code, waits for the worker it forked, and
once the worker ends kills whatever is left below it and ends the same way. Both are
child subreapers, so what an action starts stays below them even after a ``setsid``:
the worker kills what a run left behind once the run is over, the warden what a dead
worker left, and the cockpit kills the whole tree (warden first frozen) at a timeout.
ACTION_MEMORY (bytes, ``[ays] action_memory``) caps the worker's RLIMIT_DATA, which the
processes an action starts inherit. A process an action forks cannot speak the
protocol: its copies of the protocol pipes point at /dev/null, and it ends when it
returns from the action.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import signal
import sys
import time
import traceback
from types import ModuleType
from typing import Any, Callable, NoReturn, Optional, TextIO

from cockpit.process_tree import become_subreaper, die_with_parent, kill_descendants, reap_children

LOG_LIMIT = 64 * 1024  # characters of log kept per run
RESULT_LIMIT = 64 * 1024  # characters of JSON result kept per run


class BoundedLog:
    """A text sink that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int = LOG_LIMIT):
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def write(self, text: str) -> int:
        room = self.limit - self.size
        if room > 0:
            kept = text[:room]
            self.parts.append(kept)
            self.size += len(kept)
            self.dropped += len(text) - len(kept)
        else:
            self.dropped += len(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[log truncated: {self.dropped} more characters not kept]\n"
        return text


class ServiceHandle:
    """What an action gets as ``service``: name, role, instance, args, log(), emit(), send_mail()."""

    def __init__(self, data: dict[str, Any], run_id: str, output: BoundedLog, channel: "Channel"):
        self.key: str = data.get("key", "")
        self.role: str = data.get("role", "")
        self.instance: str = data.get("instance", "")
        self.name: str = self.instance
        self.repo: str = data.get("repo", "")
        self.template: str = data.get("template", "")
        self.args: dict[str, Any] = data.get("args", {})
        self._run_id = run_id
        self._output = output
        self._channel = channel

    def __repr__(self) -> str:
        return f"<service {self.key} in {self.repo}>"

    def log(self, *parts: Any) -> None:
        """Add a line to this run's log."""
        self._output.write(" ".join(str(part) for part in parts) + "\n")

    def emit(self, type: str, **fields: Any) -> None:
        """Publish an event of ``type``; raises EventError (naming the field) when it is not valid."""
        from cockpit.events import from_data

        fields.setdefault("source", "ays")
        event = from_data({**fields, "type": type})
        data = event.to_dict()
        if "epoch" not in event.model_fields_set:
            del data["epoch"]  # the cockpit's bus stamps it from its clock
        self._channel.send({"op": "emit", "id": self._run_id, "event": data})

    def send_mail(self, to: Any, subject: str, body: str = "", cc: Any = (), bodytype: str = "text") -> None:
        """Send a mail through the cockpit's relay."""
        to_list = [to] if isinstance(to, str) else list(to)
        cc_list = [cc] if isinstance(cc, str) else list(cc)
        if not to_list or not all(isinstance(a, str) and "@" in a for a in to_list + cc_list):
            raise ValueError(f"send_mail: expected mail addresses, got to={to!r} cc={cc!r}")
        self._channel.send({"op": "mail", "id": self._run_id, "mail": {
            "to": to_list, "cc": cc_list, "subject": str(subject), "body": str(body), "bodytype": bodytype}})


class Channel:
    """The protocol side of stdout: one JSON object a line, flushed at once, from the worker alone."""

    def __init__(self, stream: TextIO):
        self.stream: Optional[TextIO] = stream
        self.pid = os.getpid()

    def send(self, message: dict[str, Any]) -> None:
        if self.stream is None:
            raise RuntimeError("service.emit() and service.send_mail() work in the action's own process only, "
                               "not in a process it forked")
        self.stream.write(json.dumps(message, default=str) + "\n")
        self.stream.flush()


class ActionLoader:
    """Loads ``actions.py`` files, once per (path, mtime)."""

    def __init__(self) -> None:
        self.modules: dict[str, tuple[int, ModuleType]] = {}
        self._arity: dict[Callable[..., Any], int] = {}
        self._loaded = 0

    def module(self, path: str) -> ModuleType:
        mtime = os.stat(path).st_mtime_ns
        cached = self.modules.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        self._loaded += 1
        spec = importlib.util.spec_from_file_location(f"ays_actions_{self._loaded}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.modules[path] = (mtime, module)
        return module

    def call(self, path: str, action: str, service: ServiceHandle, event: Any) -> Any:
        function = getattr(self.module(path), action, None)
        if not callable(function):
            raise LookupError(f"{path} has no action {action!r}")
        arity = self._arity.get(function)
        if arity is None:
            params = inspect.signature(function).parameters.values()
            if any(p.kind == p.VAR_POSITIONAL for p in params):
                arity = 2
            else:
                arity = min(2, sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)))
            self._arity[function] = arity
        return function(*(service, event)[:arity])


def _result(value: Any) -> Any:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = json.dumps(repr(value))
    if len(text) > RESULT_LIMIT:
        return repr(value)[:RESULT_LIMIT] + " [result truncated]"
    return json.loads(text)


def run_one(job: dict[str, Any], loader: ActionLoader, channel: Channel, now: Callable[[], float],
            memory: int = 0) -> dict[str, Any]:
    """Run one job, kill what it left running, and say how it went (the ``done`` message).

    ``now``: this process's clock, for the run's started and ended. ``memory``: the RLIMIT_DATA the
    worker runs under, named in the log of a run that hit it.
    """
    output = BoundedLog()
    started = now()
    state, result = "ok", None
    exit_code = 0
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = output
    try:
        event = None
        if job.get("event") is not None:
            from cockpit.events import from_data
            event = from_data(job["event"])
        service = ServiceHandle(job.get("service", {}), job["id"], output, channel)
        result = _result(loader.call(job["path"], job["action"], service, event))
    except BaseException as exc:  # SystemExit too: an action may not end its worker
        state = "error"
        if isinstance(exc, SystemExit):
            exit_code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        else:
            exit_code = 1
        try:
            output.write(traceback.format_exc())
        except MemoryError:
            output.write(f"{type(exc).__name__}\n")
        if isinstance(exc, MemoryError) and memory:
            output.write(f"the action ran out of memory: it exceeded [ays] action_memory ({memory} bytes "
                         "of data for the worker it runs in, the worker's own included; each process it "
                         "starts has the same cap)\n")
    finally:
        sys.stdout, sys.stderr = saved
    if os.getpid() != channel.pid:
        # a process the action forked came back here: the run is its parent's, and so is this worker
        os._exit(exit_code)
    left = clean_up()
    if left:
        output.write(f"the action left {len(left)} process(es) running; they were killed: "
                     f"{', '.join(map(str, left))}\n")
    return {"op": "done", "id": job["id"], "state": state, "log": output.getvalue(), "result": result,
            "started": started, "ended": now()}


def clean_up() -> list[int]:
    """Reap this process's ended children, kill and reap the live ones and all below; returns the killed."""
    reap_children([])
    killed = kill_descendants(os.getpid())
    reap_children(killed)
    return killed


def cap_memory(limit: int) -> int:
    """Lower this process's RLIMIT_DATA (soft and hard, so that an action cannot raise it) to ``limit``."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    return cap


def _point_at_devnull(*fds: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(devnull, fd, inheritable=fd <= 2)
    os.close(devnull)


class _Stop(Exception):
    pass


def _stop(signum: int, frame: Any) -> None:
    raise _Stop()


def warden(worker: int) -> NoReturn:
    """Wait for ``worker`` to end, kill and reap everything left below this process, and end as it did."""
    # the protocol pipes are the worker's alone: when it is gone, the cockpit sees them close
    _point_at_devnull(0, 1)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the cockpit decides when its workers stop
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    die_with_parent(signal.SIGTERM)
    status: Optional[int] = None
    try:
        while status is None:
            pid, code = os.wait()  # the worker, or an orphan of its that came to this subreaper
            if pid == worker:
                status = code
    except (_Stop, ChildProcessError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    clean_up()
    if status is None or os.WIFSIGNALED(status):
        signum = signal.SIGKILL if status is None else os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))


def serve(memory: int, now: Callable[[], float]) -> None:
    """The worker: answer runs on the protocol until stdin ends; ``now`` is its clock."""
    die_with_parent(signal.SIGKILL)  # its warden is gone only if someone killed it
    become_subreaper()
    cap = cap_memory(memory) if memory else 0
    protocol_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    # what the action starts gets /dev/null as stdin, and anything written to fd 1 lands on
    # stderr, outside the protocol
    _point_at_devnull(0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = Channel(protocol_out)

    def disown() -> None:  # in a process the action forks
        channel.stream = None
        _point_at_devnull(protocol_in.fileno(), protocol_out.fileno())

    os.register_at_fork(after_in_child=disown)
    loader = ActionLoader()
    channel.send({"op": "ready", "pid": os.getpid()})
    for line in protocol_in:
        if not line.strip():
            continue
        message = json.loads(line)
        for job in message.get("runs", ()):
            channel.send(run_one(job, loader, channel, now, cap))


def main() -> None:
    memory = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    # the cockpit's own process must stay responsive while actions burn CPU
    try:
        os.nice(5)
    except OSError:
        pass
    become_subreaper()
    worker = os.fork()
    if worker:
        warden(worker)
    serve(memory, time.time)  # a process without a reactor: the wall clock, handed on from here
    # threads an action left running do not keep a worker that was told to stop
    os._exit(0)


if __name__ == "__main__":
    main()
