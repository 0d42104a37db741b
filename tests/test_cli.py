"""The ``cockpit`` console script, run as an operator runs it, against real cockpit processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import treq
from twisted.internet import protocol, reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from cockpit.cli import live_events, parse_pairs
from tests.cockpits import ROOT, TWISTD, call, eventually, spawn_cockpit, subscribe_a_service

SCRIPT = str(Path(sys.executable).parent / "cockpit")
TOKEN = "cli-test-token"


def run_cli(*args: str, stdin: bytes = b"", env: Optional[dict[str, str]] = None,
            module: bool = False) -> Deferred:
    """``(exit status, stdout, stderr)`` of one run of the installed script (``python -m cockpit`` with
    ``module``), in a thread: the cockpit it talks to is another process, the reactor keeps turning."""
    if not os.path.exists(SCRIPT):
        raise AssertionError(f"{SCRIPT} is missing: pip install . puts the console script there")
    command = [sys.executable, "-m", "cockpit", *args] if module else [SCRIPT, *args]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("COCKPIT_")}

    def run() -> tuple[int, str, str]:
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=60, cwd=tempfile.gettempdir(),
                              env={**environ, **(env or {})})
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    return threads.deferToThread(run)


def base(cockpit: Any) -> str:
    return cockpit.api.removesuffix("/api")


@inlineCallbacks
def recent(cockpit: Any, type_: str, token: str = TOKEN):
    response = yield treq.get(f"{cockpit.api}/events?type={type_}", persistent=False,
                              headers={"Authorization": f"Bearer {token}"})
    body = yield response.json()
    assert response.code == 200, body
    return body["events"]


class Lines(protocol.ProcessProtocol):
    """A running ``cockpit tail``: the lines it printed, the first of them, and its exit status."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.first_line: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.first_line.called:
            self.first_line.callback(self.out.split(b"\n")[0].decode())

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


class ParsingTests(TestCase):
    def test_pairs_are_text_and_colon_equals_pairs_are_json(self):
        self.assertEqual({"msg": "a=b", "n": 3, "ok": True, "tags": ["x"], "empty": ""},
                         parse_pairs(["msg=a=b", "n:=3", "ok:=true", 'tags:=["x"]', "empty="]))

    def test_live_events_are_the_data_of_each_frame_and_comments_are_skipped(self):
        stream = [b": live events of the cockpit\n", b"\n", b"event: alarm\n", b"id: g1\n",
                  b'data: {"a": 1}\n', b"\n", b": keep-alive\n", b"\n", b"event: eco\r\n",
                  b"data: one\r\n", b"data: two\r\n", b"\r\n", b"data: unfinished\n"]
        self.assertEqual(['{"a": 1}', "one\ntwo"], list(live_events(iter(stream))))


class CliTests(TestCase):
    """One cockpit with a token; each test drives it through the script."""

    @inlineCallbacks
    def setUp(self):
        self.cockpit = spawn_cockpit(self, api=f'tokens = ["{TOKEN}"]')
        yield self.cockpit.started()
        self.env = {"COCKPIT_URL": base(self.cockpit), "COCKPIT_TOKEN": TOKEN}

    @inlineCallbacks
    def test_send_with_pairs_publishes_text_and_json_values(self):
        code, out, err = yield run_cli("send", "alarm", "service=db!main", "msg=disk full",
                                       "severity=critical", 'labels:={"team": "ops"}', "epoch:=1700000000",
                                       env=self.env)
        self.assertEqual((0, ""), (code, err))
        guid = json.loads(out)["guid"]
        [event] = [e for e in (yield recent(self.cockpit, "alarm")) if e["guid"] == guid]
        self.assertEqual(("db!main", "disk full", "critical", {"team": "ops"}, 1700000000, "rest"),
                         (event["service"], event["msg"], event["severity"], event["labels"],
                          event["epoch"], event["source"]))

    @inlineCallbacks
    def test_send_reads_json_from_stdin(self):
        body = {"tags": ["deploy"], "args": {"version": 3}}
        code, out, err = yield run_cli("send", "generic", "-", stdin=json.dumps(body).encode(), env=self.env)
        self.assertEqual((0, ""), (code, err))
        guid = json.loads(out)["guid"]
        [event] = [e for e in (yield recent(self.cockpit, "generic")) if e["guid"] == guid]
        self.assertEqual((["deploy"], {"version": 3}), (event["tags"], event["args"]))

    @inlineCallbacks
    def test_send_reads_yaml_from_stdin_with_python_m_cockpit(self):
        yaml_text = b"io: input\naction: repo.create\nargs:\n  name: 'env du-conv2'\n  chat_id: 42\n"
        code, out, err = yield run_cli("--url", base(self.cockpit), "send", "telegram", "-", stdin=yaml_text,
                                       env={"COCKPIT_TOKEN": TOKEN}, module=True)
        self.assertEqual((0, ""), (code, err))
        guid = json.loads(out)["guid"]
        [event] = [e for e in (yield recent(self.cockpit, "telegram")) if e["guid"] == guid]
        self.assertEqual(("repo.create", {"name": "env du-conv2", "chat_id": 42}), (event["action"], event["args"]))

    @inlineCallbacks
    def test_broken_yaml_on_stdin_is_one_line_and_exit_2(self):
        code, out, err = yield run_cli("send", "alarm", "-", stdin=b"service: a!b\n\tmsg: x\n", env=self.env)
        self.assertEqual((2, ""), (code, out))
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertIn("YAML", err)

    @inlineCallbacks
    def test_an_event_the_cockpit_refuses_is_its_sentence_and_exit_1(self):
        code, out, err = yield run_cli("send", "alarm", "service=no-bang", env=self.env)
        self.assertEqual((1, ""), (code, out))
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertTrue(err.startswith("cockpit: ") and "service" in err, err)
        self.assertNotIn("Traceback", err)

    @inlineCallbacks
    def test_a_pair_with_no_equals_sign_is_a_usage_error(self):
        code, out, err = yield run_cli("send", "alarm", "service", env=self.env)
        self.assertEqual((2, ""), (code, out))
        self.assertEqual(["cockpit: 'service' is not key=value or key:=json"], err.splitlines())

    @inlineCallbacks
    def test_a_wrong_token_is_one_line_and_exit_1(self):
        code, out, err = yield run_cli("--token", "wrong", "send", "alarm", "service=db!main",
                                       env={"COCKPIT_URL": base(self.cockpit)})
        self.assertEqual((1, ""), (code, out))
        self.assertEqual(["cockpit: That token is not one of the cockpit's [api] tokens"], err.splitlines())

    def tail(self) -> tuple[Lines, Any]:
        """A ``cockpit tail --type alarm`` running, killed at the end of the test if it still runs."""
        lines = Lines()
        transport = reactor.spawnProcess(lines, SCRIPT, [SCRIPT, "tail", "--type", "alarm"],
                                         env={**os.environ, **self.env})
        self.addCleanup(lambda: None if lines.ended.called else (transport.signalProcess("KILL"), lines.ended)[1])
        return lines, transport

    @inlineCallbacks
    def test_tail_prints_live_events_of_its_type_one_json_line_each_and_ends_quietly_on_ctrl_c(self):
        lines, transport = self.tail()

        @inlineCallbacks
        def an_alarm_was_printed():
            # the stream may open after the first alarms: post until one arrives; a generic one
            # each time too, which --type alarm must leave out
            for type_, body in (("generic", {"tags": ["not-shown"]}), ("alarm", {"service": "db!tail"})):
                response = yield treq.post(f"{self.cockpit.api}/events/{type_}", json=body, persistent=False,
                                           headers={"Authorization": f"Bearer {TOKEN}"})
                yield response.content()
            return lines.first_line.called

        yield eventually(an_alarm_was_printed, timeout=30, interval=0.2, what="a live alarm on tail's stdout")
        first = yield lines.first_line
        event = json.loads(first)
        self.assertEqual(("alarm", "db!tail"), (event["type"], event["service"]))
        transport.signalProcess("INT")
        code = yield lines.ended
        self.assertEqual((0, b""), (code, lines.err))
        printed = [json.loads(line) for line in lines.out.decode().splitlines()]
        self.assertEqual({"alarm"}, {e["type"] for e in printed})

    @inlineCallbacks
    def test_tail_whose_cockpit_goes_away_says_so_in_one_line_and_exits_1(self):
        lines, _ = self.tail()

        @inlineCallbacks
        def an_alarm_was_printed():
            response = yield treq.post(f"{self.cockpit.api}/events/alarm", json={"service": "db!tail"},
                                       persistent=False, headers={"Authorization": f"Bearer {TOKEN}"})
            yield response.content()
            return lines.first_line.called

        yield eventually(an_alarm_was_printed, timeout=30, interval=0.2, what="a live alarm on tail's stdout")
        self.cockpit.signal("KILL")
        code = yield lines.ended
        self.assertEqual(1, code)
        self.assertEqual(1, len(lines.err.splitlines()), lines.err)
        self.assertIn(b"live stream", lines.err)

    @inlineCallbacks
    def test_tail_with_a_wrong_token_is_one_line_and_exit_1(self):
        code, out, err = yield run_cli("tail", "--token", "wrong", env={"COCKPIT_URL": base(self.cockpit)})
        self.assertEqual((1, ""), (code, out))
        self.assertEqual(["cockpit: That token is not one of the cockpit's [api] tokens"], err.splitlines())


class RunsTests(TestCase):
    @inlineCallbacks
    def test_runs_lists_the_runs_of_a_service_filtered_by_state(self):
        cockpit = spawn_cockpit(self)
        yield cockpit.started()
        yield subscribe_a_service(cockpit.api, "def handle(service, event):\n    pass\n")
        env = {"COCKPIT_URL": base(cockpit)}
        code, out, err = yield run_cli("send", "alarm", "service=slow!one", "msg=go", env=env)
        self.assertEqual((0, ""), (code, err))
        guid = json.loads(out)["guid"]

        @inlineCallbacks
        def the_run_is_listed():
            code, out, err = yield run_cli("runs", "--service", "slow!one", "--state", "ok", "--limit", "10",
                                           env=env)
            assert (code, err) == (0, ""), (code, err)
            runs = [json.loads(line) for line in out.splitlines()]
            return [run for run in runs if run["trigger"].get("event_guid") == guid]

        [run] = yield eventually(the_run_is_listed, timeout=30, interval=0.2, what="the alarm's run")
        self.assertEqual(("slow!one", "handle", "ok"), (run["service"], run["action"], run["state"]))
        code, out, err = yield run_cli("runs", "--service", "slow!one", "--state", "error", env=env)
        self.assertEqual((0, "", ""), (code, out, err))
        _, listed = yield call("GET", f"{cockpit.api}/runs?service=slow!one")
        self.assertIn(run["id"], [r["id"] for r in listed["runs"]])

    @inlineCallbacks
    def test_a_bad_state_is_the_cockpits_sentence_and_exit_1(self):
        cockpit = spawn_cockpit(self)
        yield cockpit.started()
        code, out, err = yield run_cli("runs", "--state", "bogus", env={"COCKPIT_URL": base(cockpit)})
        self.assertEqual((1, ""), (code, out))
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertIn("state", err)


class OfflineTests(TestCase):
    """What needs no running cockpit."""

    @inlineCallbacks
    def test_an_unreachable_url_is_one_line_and_exit_1(self):
        with socket.socket() as sock:  # a port that was free a moment ago and listens to nothing
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        code, out, err = yield run_cli("--url", f"http://127.0.0.1:{port}", "runs")
        self.assertEqual((1, ""), (code, out))
        self.assertEqual([f"cockpit: cannot reach the cockpit at http://127.0.0.1:{port}: Connection refused"],
                         err.splitlines())

    @inlineCallbacks
    def test_a_url_that_is_no_http_url_is_a_usage_error(self):
        code, out, err = yield run_cli("runs", env={"COCKPIT_URL": "localhost:8080"})
        self.assertEqual((2, ""), (code, out))
        self.assertEqual(["cockpit: 'localhost:8080' is not the cockpit's URL: expected http://host:port "
                          "(--url or $COCKPIT_URL)"], err.splitlines())

    @inlineCallbacks
    def test_config_check_of_a_good_file_says_ok(self):
        path = self.write("[cockpit]\ndata_dir = \"/tmp/cockpit-cli\"\n[api]\nport = 8089\ntokens = [\"t\"]\n")
        result = yield run_cli("config", "check", path)
        self.assertEqual((0, "ok\n", ""), result)
        self.assertEqual((0, "ok\n", ""), (yield run_cli("config", "check", str(ROOT / "config.example.toml"))))

    @inlineCallbacks
    def test_config_check_of_a_bad_file_is_start_ups_one_line_and_exit_2(self):
        for text in ("[api]\nport = \"eighty\"\n", "[api\n", "[mail]\nlisten = \"nonsense:x\"\n",
                     "[cockpit]\nwho = 1\n"):
            path = self.write(text)
            code, out, err = yield run_cli("config", "check", path)
            self.assertEqual((2, ""), (code, out), text)
            self.assertEqual(1, len(err.splitlines()), err)
            started = yield threads.deferToThread(
                subprocess.run, [TWISTD, "-n", "--pidfile=", "cockpit", "--config", path],
                capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            self.assertEqual((2, started.stderr.decode()), (started.returncode, err), text)

    @inlineCallbacks
    def test_config_check_of_a_missing_file_is_one_line_and_exit_2(self):
        code, out, err = yield run_cli("config", "check", "/nonexistent/cockpit.toml")
        self.assertEqual((2, ""), (code, out))
        self.assertEqual(["cockpit: /nonexistent/cockpit.toml: cannot read the config file: No such file or directory"],
                         err.splitlines())

    @inlineCallbacks
    def test_an_unknown_command_is_one_line_and_exit_2(self):
        code, out, err = yield run_cli("frobnicate")
        self.assertEqual((2, ""), (code, out))
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertTrue(err.startswith("cockpit: "), err)

    def write(self, text: str) -> str:
        handle, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(handle, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path


