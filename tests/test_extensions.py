"""[[servers]] service extensions on a Clock, and each bad extension as real ``twistd`` reports it
(docs/design.md §13)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cockpit import config, extensions
from cockpit.backends.embedded import MemoryBus
from cockpit.extensions import Extension, build_extensions, check_extensions
from cockpit.web import Api
from tests.cockpits import ROOT, TWISTD

EXAMPLES = str(ROOT / "examples")


class NeverStops:
    """A service whose stop() never finishes."""

    def __init__(self, context: Any):
        self.context = context

    def start(self) -> None:
        pass

    def stop(self) -> Deferred:
        return Deferred()


class GivesUp:
    """A service that tells the cockpit, two seconds after its start, that it has stopped working."""

    def __init__(self, context: Any):
        self.context = context

    def start(self) -> None:
        self.context.reactor.callLater(2, self.context.failed, "the vendor feed closed")

    def stop(self) -> None:
        pass


TICKER = {"name": "ticker", "service": "ticker:Ticker", "settings": {"every": 1}}


class ServiceExtensionTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(clock=self.clock)
        self.start_failures: list[str] = []
        self.logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "cockpit.extensions":
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        saved_path = list(sys.path)
        self.addCleanup(sys.path.__setitem__, slice(None), saved_path)
        self.addCleanup(sys.modules.pop, "ticker", None)

    def build(self, *servers: dict[str, Any]) -> dict[str, Extension]:
        """The extensions ``servers`` describe, as tap.build makes them, started."""
        cfg = config.from_dict({"cockpit": {"python_path": [EXAMPLES]}, "servers": list(servers)})
        built = build_extensions(cfg, check_extensions(cfg), self.clock, self.bus, store=None,
                                 site_factory=lambda resource: None, on_start_failure=self.start_failures.append)
        for extension in built:
            extension.startService()
        return {extension.server.name: extension for extension in built}

    def ticks(self) -> list[Any]:
        return [event for _, event in self.successResultOf(self.bus.recent("generic"))]

    @inlineCallbacks
    def health(self, built: dict[str, Extension]):
        api = Api(config.from_dict({}), self.bus, clock=self.clock, services={})
        for name, extension in built.items():
            api.extensions[name] = extension.health
        response = yield StubTreq(api.app.resource()).get("http://cockpit/api/health")
        return response.code, (yield response.json())

    def test_the_ticker_publishes_a_generic_event_each_second_of_its_clock_with_its_source(self):
        ticker = self.build(TICKER)["ticker"]
        self.assertEqual(([], "running"), (self.ticks(), ticker.state))
        for _ in range(3):
            self.clock.advance(1)
        ticks = self.ticks()
        self.assertEqual([("generic", "ext:ticker", ["tick"])] * 3, [(e.type, e.source, e.tags) for e in ticks])
        self.assertEqual([3, 2, 1], [e.epoch for e in ticks])  # newest first, each at its second
        self.assertEqual([], self.start_failures)

    @inlineCallbacks
    def test_a_stopped_ticker_publishes_no_more_and_health_says_stopped(self):
        built = self.build(TICKER)
        self.clock.advance(1)
        self.successResultOf(built["ticker"].stopService())
        self.assertEqual([], self.clock.getDelayedCalls())  # neither its loop nor the stop's timeout is left
        self.clock.advance(5)
        self.assertEqual(1, len(self.ticks()))
        code, health = yield self.health(built)
        self.assertEqual((200, {"ticker": {"kind": "service", "state": "stopped", "error": None}}),
                         (code, health["extensions"]))

    def test_a_stop_that_never_finishes_is_abandoned_after_the_stop_timeout_with_a_log_line(self):
        stuck = self.build({"name": "stuck", "service": "tests.test_extensions:NeverStops"})["stuck"]
        stopping = stuck.stopService()
        self.clock.advance(extensions.STOP_TIMEOUT - 0.5)
        self.assertNoResult(stopping)
        self.assertFalse([line for line in self.logged if "had not stopped" in line])
        self.clock.advance(0.5)
        self.assertIsNone(self.successResultOf(stopping))
        self.assertEqual(["extension stuck had not stopped after 10s: left as it is"],
                         [line for line in self.logged if "had not stopped" in line])
        self.assertEqual("stopped", stuck.state)

    @inlineCallbacks
    def test_a_service_that_says_it_failed_shows_failed_in_health_and_the_rest_runs_on(self):
        built = self.build({"name": "feed", "service": "tests.test_extensions:GivesUp"}, TICKER)
        for _ in range(3):
            self.clock.advance(1)
        code, health = yield self.health(built)
        self.assertEqual((200, "ok"), (code, health["status"]))
        self.assertEqual({"feed": {"kind": "service", "state": "failed", "error": "the vendor feed closed"},
                          "ticker": {"kind": "service", "state": "running", "error": None}}, health["extensions"])
        self.assertEqual(3, len(self.ticks()))
        self.assertEqual(["extension feed failed: the vendor feed closed; the rest of the cockpit goes on"],
                         [line for line in self.logged if "failed" in line])
        self.assertEqual([], self.start_failures)  # after start-up: the cockpit is not stopped for it


MODULES = {
    "raising.py": 'raise RuntimeError("no licence file")\n',
    "plain.py": "app = 42\n",
    "starts.py": '''\
from twisted.internet import defer


class Raises:
    def __init__(self, context):
        pass

    def start(self):
        raise RuntimeError("the vendor API refused the key")

    def stop(self):
        pass


class Fails(Raises):
    def start(self):
        return defer.fail(ValueError("no route to the vendor"))
''',
}


HOOK = '[[servers]]\nname = "vendor-hook"\n'
MOUNTED = 'mount = "/ext/vendor-hook"\n'


class BadExtensionTests(TestCase):
    """Each bad [[servers]] entry stops real ``twistd`` with one line naming the server, and exit status 2."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cockpit-ext-")
        self.addCleanup(shutil.rmtree, self.dir)
        os.mkdir(os.path.join(self.dir, "modules"))
        for name, text in MODULES.items():
            with open(os.path.join(self.dir, "modules", name), "w") as handle:
                handle.write(text)
        self.path = os.path.join(self.dir, "config.toml")

    def refused(self, servers: str, started: bool = False) -> str:
        """The one line on stderr of a ``twistd -n cockpit`` with ``servers`` that exits 2.

        ``started``: the cockpit got as far as starting its services, and logged on stdout as it does.
        """
        with open(self.path, "w") as handle:
            handle.write(f'[cockpit]\ndata_dir = "{self.dir}/data"\npython_path = ["{self.dir}/modules"]\n'
                         f'[api]\nport = 0\n[mail]\nport = 0\n{servers}')
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "cockpit", "--config", self.path],
                                capture_output=True, text=True, cwd=self.dir, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = result.stderr.strip().splitlines()
        self.assertEqual((2, 1), (result.returncode, len(lines)), result.stderr + result.stdout[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        if started:
            self.assertIn("Server Shut Down.", result.stdout)  # its own services were stopped as at a SIGTERM
        else:
            self.assertNotIn("Traceback", result.stdout)
        prefix = f"cockpit: {self.path}: "
        self.assertTrue(lines[0].startswith(prefix), lines[0])
        return lines[0][len(prefix):]

    def test_a_module_that_cannot_be_imported(self):
        self.assertEqual(f"[[servers]] vendor-hook: no module named 'nowhere' on [cockpit] python_path "
                         f"({self.dir}/modules) or sys.path",
                         self.refused(HOOK + 'wsgi = "nowhere:app"\n' + MOUNTED))

    def test_a_module_that_raises_at_import(self):
        self.assertEqual("[[servers]] vendor-hook: importing raising failed: RuntimeError: no licence file",
                         self.refused(HOOK + 'wsgi = "raising:app"\n' + MOUNTED))

    def test_a_missing_attribute(self):
        self.assertEqual("[[servers]] vendor-hook: module plain has no attribute 'application'",
                         self.refused(HOOK + 'wsgi = "plain:application"\n' + MOUNTED))

    def test_an_attribute_that_is_not_callable(self):
        self.assertEqual("[[servers]] poller: plain:app is not callable (it is an int); it names a WSGI app or a "
                         "service factory", self.refused('[[servers]]\nname = "poller"\nservice = "plain:app"\n'))

    def test_a_bad_listen_string(self):
        self.assertEqual("[[servers]] vendor-hook listen: 'tcp:vendor' is not a Twisted server endpoint string such as "
                         "tcp:8080:interface=127.0.0.1 (invalid literal for int() with base 10: 'vendor')",
                         self.refused(HOOK + 'wsgi = "flask_hook:app"\nlisten = "tcp:vendor"\n'))

    def test_a_start_that_raises(self):
        self.assertEqual("[[servers]] poller: start() failed: RuntimeError: the vendor API refused the key",
                         self.refused('[[servers]]\nname = "poller"\nservice = "starts:Raises"\n', started=True))

    def test_a_start_whose_deferred_fails(self):
        self.assertEqual("[[servers]] poller: start() failed: ValueError: no route to the vendor",
                         self.refused('[[servers]]\nname = "poller"\nservice = "starts:Fails"\n', started=True))

    def test_both_kinds_set(self):
        self.assertEqual("[[servers]] poller: set one of wsgi = \"module:app\" or service = \"module:factory\"",
                         self.refused('[[servers]]\nname = "poller"\nservice = "starts:Raises"\nwsgi = "plain:app"\n'))

    def test_neither_kind_set(self):
        self.assertEqual("[[servers]] poller: set one of wsgi = \"module:app\" or service = \"module:factory\"",
                         self.refused('[[servers]]\nname = "poller"\nsettings = { every = 1 }\n'))

    def test_a_wsgi_app_with_neither_listen_nor_mount(self):
        self.assertEqual("[[servers]] vendor-hook: a wsgi app needs one of listen = \"tcp:PORT\" or "
                         "mount = \"/ext/vendor-hook\"",
                         self.refused(HOOK + 'wsgi = "plain:app"\n'))

    def test_a_mount_that_is_not_ext_and_its_name(self):
        self.assertEqual("[[servers]] vendor-hook: mount must be \"/ext/vendor-hook\" (its name), "
                         "got '/hooks/vendor'",
                         self.refused(HOOK + 'wsgi = "plain:app"\nmount = "/hooks/vendor"\n'))

    def test_a_bad_name(self):
        self.assertEqual("[[servers]] 'Vendor Hook' name: expected a name of 1 to 32 lower-case letters, digits or "
                         "'-', got 'Vendor Hook'",
                         self.refused('[[servers]]\nname = "Vendor Hook"\nwsgi = "plain:app"\nmount = "/ext/vendor"\n'))

    def test_two_servers_of_one_name(self):
        self.assertEqual("[[servers]]: two servers are named 'poller'; each name is its own",
                         self.refused('[[servers]]\nname = "poller"\nservice = "starts:Raises"\n' * 2))
