"""[[servers]] WSGI apps in real ``twistd -n cockpit`` processes (docs/design.md §13).

The app is the real Flask one in examples/flask_hook.py, reached through ``[cockpit] python_path``:
what it publishes is an alarm the AYS robot runs, it sits behind ``[api] tokens`` unless public,
it answers 503 while the bus is down and 400 for a bad event, and a slow handler holds up neither
the REST API nor SMTP.
"""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
from typing import Any

import treq
from twisted.internet import defer, threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.cockpits import ROOT, all_runs, call, eventually, spawn_cockpit, subscribe_a_service
from tests.redis_server import RedisServer

EXAMPLES = f'python_path = ["{ROOT / "examples"}"]'
TOKEN = "ext-test-token"
ACTIONS = "def handle(service, event):\n    pass\n"

VENDOR_MOUNTED = '[[servers]]\nname = "vendor"\nwsgi = "flask_hook:app"\nmount = "/ext/vendor"\n'
PUBLIC = "public = true\n"
TICKER = '[[servers]]\nname = "ticker"\nservice = "ticker:Ticker"\nsettings = { every = 60 }\n'


def site(cockpit: Any) -> str:
    """The main site's base URL (its API is under /api)."""
    return cockpit.api[:-len("/api")]


@inlineCallbacks
def run_of(api: str, guid: str):
    """The finished run the AYS robot made for the event ``guid``."""
    def finished():
        d = all_runs(api)
        d.addCallback(lambda runs: [run for run in runs if run["trigger"].get("event_guid") == guid
                                    and run["state"] in ("ok", "error", "timeout")])
        return d

    [run] = yield eventually(finished, timeout=30, interval=0.1, what=f"the run of {guid}")
    return run


@inlineCallbacks
def event_of(api: str, guid: str, headers: Any = None):
    """The alarm ``guid`` as ``GET /api/events`` lists it."""
    code, listed = yield call("GET", f"{api}/events?type=alarm&limit=100", headers=headers)
    assert code == 200, (code, listed)
    return {event["guid"]: event for event in listed["events"]}.get(guid)


class FlaskAppTests(TestCase):
    @inlineCallbacks
    def alarm_the_robot_ran(self, api: str, url: str, body: dict) -> Any:
        """POST ``body`` to the Flask example at ``url``: the alarm it made, once the robot has run its action."""
        code, reply = yield call("POST", url, body)
        self.assertEqual(202, code, reply)
        run = yield run_of(api, reply["guid"])
        self.assertEqual(("slow!one", "handle", "ok"), (run["service"], run["action"], run["state"]))
        return (yield event_of(api, reply["guid"]))

    @inlineCallbacks
    def test_a_post_to_the_mounted_flask_app_is_an_alarm_the_robot_runs_and_health_lists_both(self):
        cockpit = yield spawn_cockpit(self, cockpit_extra=EXAMPLES, extra=VENDOR_MOUNTED + PUBLIC + TICKER).started()
        yield subscribe_a_service(cockpit.api, ACTIONS)

        event = yield self.alarm_the_robot_ran(cockpit.api, f"{site(cockpit)}/ext/vendor/alert",
                                               {"host": "web1", "text": "disk full"})
        self.assertEqual(("web1!vendor", "vendor", "disk full", "ext:vendor"),
                         (event["service"], event["method"], event["msg"], event["source"]))

        code, health = yield call("GET", f"{cockpit.api}/health")
        self.assertEqual((200, {"vendor": {"kind": "wsgi", "state": "running", "error": None},
                                "ticker": {"kind": "service", "state": "running", "error": None}}),
                         (code, health["extensions"]))

    @inlineCallbacks
    def test_a_flask_app_on_its_own_listen_makes_alarms_the_robot_runs_and_is_not_on_the_main_site(self):
        extra = '[[servers]]\nname = "vendor"\nwsgi = "flask_hook:app"\nlisten = "tcp:0:interface=127.0.0.1"\n'
        cockpit = yield spawn_cockpit(self, cockpit_extra=EXAMPLES, extra=extra).started()
        yield cockpit.proc.when_output(b"vendor extension on http://127.0.0.1:")
        port = re.search(r"vendor extension on http://127\.0\.0\.1:(\d+)/", cockpit.log).group(1)
        yield subscribe_a_service(cockpit.api, ACTIONS)

        event = yield self.alarm_the_robot_ran(cockpit.api, f"http://127.0.0.1:{port}/alert",
                                               {"host": "db2", "text": "replica lag"})
        self.assertEqual(("db2!vendor", "ext:vendor"), (event["service"], event["source"]))
        code, _ = yield call("POST", f"{site(cockpit)}/ext/vendor/alert", {"host": "db2", "text": "x"})
        self.assertEqual(404, code)


class MountAuthTests(TestCase):
    @inlineCallbacks
    def test_a_mounted_app_needs_an_api_token_unless_it_is_public(self):
        extra = VENDOR_MOUNTED + '[[servers]]\nname = "open"\nwsgi = "flask_hook:app"\nmount = "/ext/open"\n' + PUBLIC
        cockpit = yield spawn_cockpit(self, cockpit_extra=EXAMPLES, extra=extra,
                                      api=f'tokens = ["{TOKEN}"]').started()
        alert = {"host": "web1", "text": "down"}
        good = {"Authorization": f"Bearer {TOKEN}"}

        code, reply = yield call("POST", f"{site(cockpit)}/ext/vendor/alert", alert)
        self.assertEqual(401, code, reply)
        self.assertIn("Authorization: Bearer", reply["error"])
        code, reply = yield call("POST", f"{site(cockpit)}/ext/vendor/alert", alert, {"Authorization": "Bearer nope"})
        self.assertEqual(401, code, reply)
        code, with_token = yield call("POST", f"{site(cockpit)}/ext/vendor/alert", alert, good)
        self.assertEqual(202, code, with_token)
        code, public = yield call("POST", f"{site(cockpit)}/ext/open/alert", alert)
        self.assertEqual(202, code, public)

        # the refused requests never reached the app: only the two accepted alarms were published
        code, listed = yield call("GET", f"{cockpit.api}/events?type=alarm", headers=good)
        self.assertEqual((200, {with_token["guid"], public["guid"]}),
                         (code, {event["guid"] for event in listed["events"]}))


class BusTests(TestCase):
    @inlineCallbacks
    def test_the_flask_app_answers_400_naming_a_bad_field_and_503_while_the_bus_is_down(self):
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        cockpit = yield spawn_cockpit(self, cockpit_extra=EXAMPLES, extra=f'[redis]\nurl = "{redis.url}"\n'
                                      + VENDOR_MOUNTED + PUBLIC).started()
        url = f"{site(cockpit)}/ext/vendor/alert"

        code, reply = yield call("POST", url, {"host": "", "text": "no host"})  # service "!vendor"
        self.assertEqual(400, code, reply)
        self.assertIn("service: expected role!instance", reply["error"])
        code, reply = yield call("POST", url, {"host": "web1", "text": "up"})
        self.assertEqual(202, code, reply)

        redis.kill()

        @inlineCallbacks
        def bus_down():
            _, health = yield call("GET", f"{cockpit.api}/health")
            return not health["bus"]["ok"]

        yield eventually(bus_down, timeout=30, interval=0.05, what="the bus seen down")
        code, reply = yield call("POST", url, {"host": "web1", "text": "while down"})
        self.assertEqual((503, {"error": "the cockpit cannot take events right now"}), (code, reply))
        code, health = yield call("GET", f"{cockpit.api}/health")
        self.assertEqual("running", health["extensions"]["vendor"]["state"])


SLOW_APP = '''\
import time


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"started\\n"  # the headers go out: the client knows the handler is running
    time.sleep(2)
    yield b"done\\n"
'''


def ehlo_and_noop(port: int) -> tuple[int, int]:
    """EHLO and NOOP over SMTP (blocking: run it in a thread); their reply codes."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        ehlo, _ = client.ehlo()
        noop, _ = client.noop()
        return ehlo, noop


class SlowHandlerTests(TestCase):
    @inlineCallbacks
    def test_a_slow_wsgi_handler_holds_up_neither_health_nor_smtp(self):
        modules = tempfile.mkdtemp(prefix="cockpit-ext-")
        self.addCleanup(shutil.rmtree, modules)
        with open(os.path.join(modules, "slow_app.py"), "w") as handle:
            handle.write(SLOW_APP)
        extra = '[[servers]]\nname = "slow"\nwsgi = "slow_app:app"\nmount = "/ext/slow"\n' + PUBLIC
        cockpit = yield spawn_cockpit(self, cockpit_extra=f'python_path = ["{modules}"]', extra=extra).started()
        answered: list[Any] = []

        response = yield treq.get(f"{site(cockpit)}/ext/slow/", persistent=False)  # its handler is sleeping now
        self.assertEqual(200, response.code)
        slow = response.content().addCallback(lambda body: answered.append(("slow", body)))
        health = call("GET", f"{cockpit.api}/health").addCallback(lambda reply: answered.append(("health", reply[0])))
        smtp = threads.deferToThread(ehlo_and_noop, cockpit.smtp_port).addCallback(
            lambda codes: answered.append(("smtp", codes)))
        yield defer.gatherResults([slow, health, smtp], consumeErrors=True)

        self.assertEqual(("slow", b"started\ndone\n"), answered[-1], answered)
        self.assertEqual({("health", 200), ("smtp", (250, 250))}, set(answered[:2]))
