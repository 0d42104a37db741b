"""Real ``twistd -n cockpit`` processes for the tests that need whole cockpits: started, loaded, stopped, killed.

Each cockpit has a data_dir of its own and says on which ports it listens; :class:`Load`
posts alarms over REST and mails over SMTP and records what each was answered.
"""
from __future__ import annotations

import os
import re
import signal
import smtplib
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Optional

import treq
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class Twistd(protocol.ProcessProtocol):
    """A cockpit process: what it wrote, where it listens, and when it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred = Deferred()  # fires with the REST port
        self.ended: Deferred = Deferred()
        self.smtp_port: Optional[int] = None
        self.pid: Optional[int] = None
        self._waiting: list[tuple[bytes, Deferred]] = []

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def when_output(self, text: bytes) -> Deferred:
        """Fires once the process has written ``text`` (at once if it has)."""
        if text in self.output:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._waiting.append((text, d))
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for entry in [e for e in self._waiting if e[0] in self.output]:
            self._waiting.remove(entry)
            entry[1].callback(None)
        if self.smtp_port is None:
            smtp = re.search(rb"SMTP on 127\.0\.0\.1:(\d+)", self.output)
            if smtp:
                self.smtp_port = int(smtp.group(1))
        match = re.search(rb"REST API and dashboard on http://127\.0\.0\.1:(\d+)/", self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


class Cockpit:
    """One running cockpit: its process, its REST base URL and its SMTP port."""

    def __init__(self, proc: Twistd, transport: Any, data: str):
        self.proc = proc
        self.transport = transport
        self.data = data
        self.api = ""
        self.smtp_port: Optional[int] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid

    @inlineCallbacks
    def started(self):
        """Fires once it listens and its bus is connected (until then it answers 503, as it should)."""
        port = yield self.proc.listening
        self.api = f"http://127.0.0.1:{port}/api"
        self.smtp_port = self.proc.smtp_port

        @inlineCallbacks
        def bus_up():
            _, health = yield call("GET", f"{self.api}/health")
            return bool(health and health["bus"].get("ok"))

        yield eventually(bus_up, timeout=30, interval=0.05, what="its bus connected")
        return self

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    @inlineCallbacks
    def stop(self):
        """SIGTERM, and the exit status."""
        self.signal("TERM")
        return (yield self.proc.ended)

    @property
    def log(self) -> str:
        return self.proc.output.decode(errors="replace")


def spawn_cockpit(test: TestCase, data: Optional[str] = None, extra: str = "", name: str = "",
                  api: str = "", cockpit_extra: str = "") -> Cockpit:
    """A real ``twistd -n cockpit`` on ``data`` (a new directory by default), ``extra`` added to its config,
    ``api`` to its ``[api]`` section and ``cockpit_extra`` to its ``[cockpit]`` section.

    Killed at the end of the test if it still runs. ``started()`` fires once it listens.
    ``name`` is in the environment of its processes, its action workers' too, as
    ``COCKPIT_TEST_NAME``: an action can say which cockpit ran it.
    """
    data = data or tempfile.mkdtemp(prefix="cockpit-")
    path = os.path.join(data, "config.toml")
    with open(path, "w") as handle:
        handle.write(f'[cockpit]\ndata_dir = "{data}"\n{cockpit_extra}\n'
                     f'[api]\nport = 0\n{api}\n[mail]\nport = 0\n{extra}')
    proc = Twistd()
    transport = reactor.spawnProcess(
        proc, TWISTD, [TWISTD, "-n", "--pidfile=", "cockpit", "--config", path],
        env={**os.environ, "PYTHONPATH": str(ROOT), "COCKPIT_TEST_NAME": name}, path=data)

    def kill_if_running() -> Optional[Deferred]:
        if proc.ended.called:
            return None
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        return proc.ended

    test.addCleanup(kill_if_running)
    return Cockpit(proc, transport, data)


@inlineCallbacks
def call(method: str, url: str, body: Any = None, headers: Optional[dict[str, str]] = None) -> Any:
    """``(status, JSON reply)`` of one request; a connection that fails raises."""
    response = yield treq.request(method, url, json=body, headers=headers, persistent=False)
    text = yield response.text()
    import json

    return response.code, (json.loads(text) if text else None)


@inlineCallbacks
def subscribe_a_service(api: str, actions: str, hrd: str = "events.alarm =\n    handle,\n",
                        template: str = "slow", instance: str = "one"):
    """A repository ``demo`` whose service runs ``actions`` for the events ``hrd`` names (README "## AYS")."""
    for method, path, body, expected in (
            ("POST", "/repos", {"name": "demo"}, (201, 409)),
            ("PUT", f"/repos/demo/templates/{template}", {"files": {"service.hrd": hrd, "actions.py": actions}},
             (200, 201)),
            ("POST", "/repos/demo/blueprints", {"name": "main.yaml", "content": f"{template}__{instance}: {{}}\n"},
             (201, 409)),
            ("POST", "/repos/demo/blueprints/main.yaml/execute", None, (202,))):
        code, reply = yield call(method, api + path, body)
        assert code in expected, (method, path, code, reply)


SLOW_ACTIONS = "import time\n\ndef handle(service, event):\n    time.sleep(0.01)\n"


def subscribe_a_slow_service(api: str) -> Deferred:
    """A service that runs a short action for every alarm."""
    return subscribe_a_service(api, SLOW_ACTIONS)


class Load:
    """Alarms posted over REST, ``parallel`` at a time, to the cockpits in turn, until :meth:`stop`.

    ``accepted`` holds the guid of each event answered 202 (and 250 for a mail, with ``mail``
    lanes), ``refused`` the statuses of refusals (503, 451), ``other`` any other answer, and
    ``unreachable`` the cockpits that did not answer at all (one that was killed).
    A lane that is refused waits a moment before it tries again, as a client backs off.
    """

    def __init__(self, apis: list[str], parallel: int = 8, mail_ports: Optional[list[int]] = None,
                 mail_lanes: int = 2, stop_on_refusal: bool = True):
        self.apis = list(apis)
        self.accepted: list[str] = []
        self.refused: list[int] = []
        self.other: list[str] = []
        self.unreachable: list[str] = []
        self.stop_on_refusal = stop_on_refusal
        self.running = True
        self._waiting: list[tuple[int, Deferred]] = []
        self._refusal_waiting: list[tuple[int, int, Deferred]] = []
        lanes = [self._post(n) for n in range(parallel)]
        lanes += [self._mail(n, port) for port in mail_ports or [] for n in range(mail_lanes)]
        self.done = defer.gatherResults(lanes)

    def stop(self) -> Deferred:
        self.running = False
        return self.done

    def _accepted(self, guid: str) -> None:
        self.accepted.append(guid)
        for count, d in list(self._waiting):
            if len(self.accepted) >= count:
                self._waiting.remove((count, d))
                d.callback(None)

    def _refusal(self, code: int) -> None:
        self.refused.append(code)
        for code_wanted, count, d in list(self._refusal_waiting):
            if self.refused.count(code_wanted) >= count:
                self._refusal_waiting.remove((code_wanted, count, d))
                d.callback(None)

    @inlineCallbacks
    def _post(self, lane: int):
        n = 0
        while self.running:
            n += 1
            api = self.apis[(lane + n) % len(self.apis)]
            try:
                code, reply = yield call("POST", f"{api}/events/alarm",
                                         {"service": f"node!n{lane}", "method": "load", "msg": str(n)})
            except Exception:
                if self.stop_on_refusal:
                    return  # the listener has closed
                if api in self.apis and len(self.apis) > 1:
                    self.apis.remove(api)
                    self.unreachable.append(api)
                continue
            if code == 202:
                self._accepted(reply["guid"])
            elif code == 503:
                self._refusal(503)
                if self.stop_on_refusal:
                    return
                yield task.deferLater(reactor, 0.05, lambda: None)
            else:
                self.other.append(f"REST {code}: {reply}")

    @inlineCallbacks
    def _mail(self, lane: int, port: int):
        n = 0
        while self.running:
            n += 1
            code, text = yield threads.deferToThread(send_mail, port, f"load {lane}.{n}")
            if code == 250:
                match = re.search(r"Accepted as (\S+)", text)
                self._accepted(match.group(1)) if match else self.other.append(f"SMTP 250 without a guid: {text}")
            elif code == 451:
                self._refusal(451)
                yield task.deferLater(reactor, 0.05, lambda: None)
            else:
                self.other.append(f"SMTP {code}: {text}")

    def when_accepted(self, count: int) -> Deferred:
        """Fires once ``count`` events have been accepted in all."""
        d: Deferred = Deferred()
        self._waiting.append((count, d))
        if len(self.accepted) >= count:
            self._waiting.remove((count, d))
            d.callback(None)
        return d

    def when_refused(self, code: int, count: int = 1) -> Deferred:
        """Fires once ``count`` refusals with ``code`` (503 or 451) have come."""
        d: Deferred = Deferred()
        self._refusal_waiting.append((code, count, d))
        if self.refused.count(code) >= count:
            self._refusal_waiting.remove((code, count, d))
            d.callback(None)
        return d


def send_mail(port: int, subject: str, body: str = "under load\n") -> tuple[int, str]:
    """One mail over SMTP (blocking: run it in a thread); the reply to its DATA."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "load@example.com", "ops@example.com", subject
    message.set_content(body)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            code, _ = client.mail("load@example.com")
            if code != 250:
                return code, "MAIL refused"
            code, _ = client.rcpt("ops@example.com")
            if code != 250:
                return code, "RCPT refused"
            code, text = client.data(message.as_bytes())
            return code, text.decode(errors="replace")
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace")
    except (OSError, smtplib.SMTPException) as exc:
        return 0, f"{exc.__class__.__name__}: {exc}"


@inlineCallbacks
def eventually(check: Any, timeout: float = 60.0, interval: float = 0.25, what: str = "the condition"):
    """Fires with ``check()``'s first true result (a Deferred may be returned), asking every ``interval``.

    For what other processes do, of which nothing here is told by a Deferred.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = yield defer.maybeDeferred(check)
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} did not come within {timeout} s")
        yield task.deferLater(reactor, interval, lambda: None)


@inlineCallbacks
def all_runs(api: str, **filters: str):
    """Every run ``GET /api/runs`` lists, page after page."""
    runs: list[dict[str, Any]] = []
    before = ""
    query = "".join(f"&{name}={value}" for name, value in filters.items())
    while True:
        code, page = yield call("GET", f"{api}/runs?limit=1000{query}{before}")
        assert code == 200, (code, page)
        runs.extend(page["runs"])
        if not page.get("next"):
            return runs
        before = f"&before={page['next']}"


def kill(cockpit: Cockpit) -> Deferred:
    """``kill -9``; fires once the process is gone."""
    cockpit.transport.signalProcess(signal.SIGKILL)
    return cockpit.proc.ended
