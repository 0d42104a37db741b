"""The plugin and the process: what an operator sees when starting and stopping the cockpit."""
from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import treq
from twisted.application.service import IServiceMaker
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.plugin import getPlugins
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.tap import build

ROOT = Path(__file__).parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class PluginTests(TestCase):
    def test_cockpit_is_a_twistd_plugin(self):
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("cockpit", makers)
        self.assertEqual("cockpit.tap", makers["cockpit"].module)

    def test_plugin_directory_has_no_init(self):
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())


class ServiceTreeTests(TestCase):
    @inlineCallbacks
    def test_tree_serves_health_and_stops(self):
        data = tempfile.mkdtemp()
        cfg = config.from_dict({"cockpit": {"data_dir": data}, "api": {"port": 0}, "mail": {"port": 0}})
        top = build(cfg, reactor)
        self.assertEqual("bus", list(top)[0].name)  # first in, last out
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        port = top.getServiceNamed("web").port.getHost().port
        response = yield treq.get(f"http://127.0.0.1:{port}/api/health", persistent=False)
        body = yield response.json()
        self.assertEqual(200, response.code)
        self.assertEqual("ok", body["status"])
        self.assertEqual("memory", body["bus"]["kind"])


class Twistd(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.listening = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        match = re.search(rb"REST API and dashboard on http://127\.0\.0\.1:(\d+)/", self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


class ProcessTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_twistd_starts_says_where_it_listens_and_exits_0_on_sigterm(self):
        data = tempfile.mkdtemp()
        path = os.path.join(data, "config.toml")
        with open(path, "w") as handle:
            handle.write(f'[cockpit]\ndata_dir = "{data}"\n[api]\nport = 0\n[mail]\nport = 0\n')
        proc = Twistd()
        transport = reactor.spawnProcess(
            proc, TWISTD, [TWISTD, "-n", "--pidfile=", "cockpit", "--config", path],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, path=data)
        def kill_if_running():
            # an assertion that fails below must not leave a cockpit running
            if not proc.ended.called:
                transport.signalProcess("KILL")
                return proc.ended
        self.addCleanup(kill_if_running)
        port = yield proc.listening
        response = yield treq.get(f"http://127.0.0.1:{port}/api/health", persistent=False)
        self.assertEqual(200, response.code)
        yield response.content()
        transport.signalProcess(signal.SIGTERM)
        code = yield proc.ended
        self.assertEqual(0, code, proc.output.decode(errors="replace"))
        self.assertNotIn(b"Traceback", proc.output)
