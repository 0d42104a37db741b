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
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import time
import traceback
from types import ModuleType
from typing import Any, Callable, Optional, TextIO

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
        self._channel.send({"op": "emit", "id": self._run_id, "event": event.to_dict()})

    def send_mail(self, to: Any, subject: str, body: str = "", cc: Any = (), bodytype: str = "text") -> None:
        """Send a mail through the cockpit's relay."""
        to_list = [to] if isinstance(to, str) else list(to)
        cc_list = [cc] if isinstance(cc, str) else list(cc)
        if not to_list or not all(isinstance(a, str) and "@" in a for a in to_list + cc_list):
            raise ValueError(f"send_mail: expected mail addresses, got to={to!r} cc={cc!r}")
        self._channel.send({"op": "mail", "id": self._run_id, "mail": {
            "to": to_list, "cc": cc_list, "subject": str(subject), "body": str(body), "bodytype": bodytype}})


class Channel:
    """The protocol side of stdout: one JSON object a line, flushed at once."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def send(self, message: dict[str, Any]) -> None:
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


def run_one(job: dict[str, Any], loader: ActionLoader, channel: Channel) -> dict[str, Any]:
    """Run one job and say how it went (the ``done`` message)."""
    output = BoundedLog()
    started = time.time()
    state, result = "ok", None
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = output  # type: ignore[assignment]
    try:
        event = None
        if job.get("event") is not None:
            from cockpit.events import from_data
            event = from_data(job["event"])
        service = ServiceHandle(job.get("service", {}), job["id"], output, channel)
        result = _result(loader.call(job["path"], job["action"], service, event))
    except BaseException:  # SystemExit too: an action may not end its worker
        state = "error"
        output.write(traceback.format_exc())
    finally:
        sys.stdout, sys.stderr = saved
    return {"op": "done", "id": job["id"], "state": state, "log": output.getvalue(), "result": result,
            "started": started, "ended": time.time()}


def main(stdin: Optional[TextIO] = None) -> None:
    # the cockpit's own process must stay responsive while actions burn CPU
    try:
        os.nice(5)
    except OSError:
        pass
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything written to fd 1 from now on lands on stderr, outside the protocol
    sys.stdout = sys.stderr
    channel = Channel(protocol_out)
    loader = ActionLoader()
    channel.send({"op": "ready", "pid": os.getpid()})
    source = stdin or sys.stdin
    for line in source:
        if not line.strip():
            continue
        message = json.loads(line)
        for job in message.get("runs", ()):
            channel.send(run_one(job, loader, channel))


if __name__ == "__main__":
    main()
