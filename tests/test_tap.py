"""The plugin and the process: what an operator sees when starting and stopping the cockpit."""
from __future__ import annotations

import tempfile

import treq
from twisted.application.service import IServiceMaker, Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.plugin import getPlugins
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.tap import ServiceTree, build
from tests.cockpits import ROOT, spawn_cockpit


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


class StopOrderTests(TestCase):
    def setUp(self):
        self.stopping: list[str] = []
        self.tree = ServiceTree()
        self.parts = {}
        for name in ("bus", "robot", "web"):
            part = self.parts[name] = Service()
            part.setName(name)
            part.stopped = Deferred()
            part.stopService = lambda part=part: (self.stopping.append(part.name), part.stopped)[1]
            part.setServiceParent(self.tree)
        self.tree.startService()

    def test_services_stop_in_reverse_order_each_once_the_next_has_stopped(self):
        done = self.tree.stopService()
        self.assertEqual(["web"], self.stopping)
        self.parts["web"].stopped.callback(None)
        self.assertEqual(["web", "robot"], self.stopping)  # the bus stays up while the robot drains
        self.parts["robot"].stopped.callback(None)
        self.assertEqual(["web", "robot", "bus"], self.stopping)
        self.assertNoResult(done)
        self.parts["bus"].stopped.callback(None)
        self.successResultOf(done)

    def test_a_service_that_fails_to_stop_is_logged_and_the_others_still_stop(self):
        done = self.tree.stopService()
        self.parts["web"].stopped.errback(RuntimeError("the listener would not close"))
        self.parts["robot"].stopped.callback(None)
        self.parts["bus"].stopped.callback(None)
        self.successResultOf(done)
        self.assertEqual(["web", "robot", "bus"], self.stopping)
        self.assertEqual(1, len(self.flushLoggedErrors(RuntimeError)))

    def test_the_cockpit_tree_is_stopped_in_order(self):
        cfg = config.from_dict({"cockpit": {"data_dir": self.mktemp()}})
        self.assertIsInstance(build(cfg, reactor), ServiceTree)


class ProcessTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_twistd_starts_says_where_it_listens_and_exits_0_on_sigterm(self):
        cockpit = yield spawn_cockpit(self).started()
        response = yield treq.get(f"{cockpit.api}/health", persistent=False)
        self.assertEqual(200, response.code)
        yield response.content()
        code = yield cockpit.stop()
        self.assertEqual(0, code, cockpit.log)
        self.assertNotIn("Traceback", cockpit.log)
