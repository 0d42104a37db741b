"""The plugin and the process: what an operator sees when starting and stopping the cockpit."""
from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import treq
from twisted.application.service import IServiceMaker, Service
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.plugin import getPlugins
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.backends.redis import RedisBus
from cockpit.backends.redis.telegram import redis_key
from cockpit.bus import AYS_GROUP
from cockpit.config import RedisSection
from cockpit.tap import ServiceTree, build
from tests.fake_telegram import FakeTelegram, FakeTelegramServer
from tests.redis_server import shared_server
from tests.test_telegram_api import TOKEN

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


def spawn_cockpit(test: TestCase, data: str, extra: str = "") -> tuple[Twistd, object]:
    """A real ``twistd -n cockpit`` on ``data``; killed at the end of the test if still running."""
    path = os.path.join(data, "config.toml")
    with open(path, "w") as handle:
        handle.write(f'[cockpit]\ndata_dir = "{data}"\n[api]\nport = 0\n[mail]\nport = 0\n{extra}')
    proc = Twistd()
    transport = reactor.spawnProcess(
        proc, TWISTD, [TWISTD, "-n", "--pidfile=", "cockpit", "--config", path],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, path=data)

    def kill_if_running():
        if not proc.ended.called:
            transport.signalProcess("KILL")
            return proc.ended
    test.addCleanup(kill_if_running)
    return proc, transport


@inlineCallbacks
def subscribe_a_slow_service(api: str):
    """A repository whose service runs a short action for every alarm (README "## AYS")."""
    response = yield treq.post(f"{api}/repos", json={"name": "demo"}, persistent=False)
    assert response.code == 201, (response.code, (yield response.text()))
    files = {"service.hrd": "events.alarm =\n    handle,\n",
             "actions.py": "import time\n\ndef handle(service, event):\n    time.sleep(0.01)\n"}
    yield (yield treq.put(f"{api}/repos/demo/templates/slow", json={"files": files}, persistent=False)).content()
    yield (yield treq.post(f"{api}/repos/demo/blueprints", json={"name": "main.yaml", "content": "slow__one: {}\n"},
                           persistent=False)).content()
    response = yield treq.post(f"{api}/repos/demo/blueprints/main.yaml/execute", persistent=False)
    yield response.content()
    assert response.code == 202, (response.code, (yield response.text()))


class Load:
    """Alarms posted to a cockpit, ``parallel`` at a time, until it stops answering."""

    def __init__(self, api: str, parallel: int = 8):
        self.api = api
        self.accepted = 0
        self._waiting: list[tuple[int, Deferred]] = []
        self.done = defer.gatherResults([self._post_until_refused(n) for n in range(parallel)])

    @inlineCallbacks
    def _post_until_refused(self, lane: int):
        n = 0
        while True:
            n += 1
            try:
                response = yield treq.post(f"{self.api}/events/alarm", persistent=False,
                                           json={"service": f"node!n{lane}", "method": "load", "msg": str(n)})
                yield response.content()
            except Exception:
                return  # the listener has closed
            if response.code != 202:
                return
            self.accepted += 1
            for count, d in list(self._waiting):
                if self.accepted >= count:
                    self._waiting.remove((count, d))
                    d.callback(None)

    def when_accepted(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append((count, d))
        return d


class RedisProcessTests(TestCase):
    """Real cockpits on a real Redis, stopped cleanly or killed while events are in flight."""

    timeout = 90

    @inlineCallbacks
    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()
        self.bus = RedisBus(RedisSection(url=self.redis.url))
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        yield self.bus.when_connected()

    @inlineCallbacks
    def groups_and_consumers(self):
        """``{(stream, group): {consumer: pending}}`` of every stream in Redis."""
        found = {}
        for stream in (yield self.bus.execute("KEYS", "ckpt.*")):
            if (yield self.bus.execute("TYPE", stream)) != "stream":
                continue
            for group in (yield self.bus.execute("XINFO", "GROUPS", stream)):
                name = dict(zip(group[::2], group[1::2]))["name"]
                rows = yield self.bus.execute("XINFO", "CONSUMERS", stream, name)
                found[(stream, name)] = {dict(zip(r[::2], r[1::2]))["name"]: int(dict(zip(r[::2], r[1::2]))["pending"])
                                         for r in rows}
        return found

    @inlineCallbacks
    def test_sigterm_under_load_leaves_nothing_pending_no_consumer_and_no_lease(self):
        fake = FakeTelegram(TOKEN, clock=reactor)
        telegram = FakeTelegramServer(fake).start()
        self.addCleanup(telegram.stop)
        data = tempfile.mkdtemp()
        proc, transport = spawn_cockpit(self, data, f'[redis]\nurl = "{self.redis.url}"\n[ays]\nworkers = 2\n'
                                                    f'[bot]\ntoken = "{TOKEN}"\napi_url = "{telegram.url}"\n')
        port = yield proc.listening
        api = f"http://127.0.0.1:{port}/api"
        yield subscribe_a_slow_service(api)
        yield fake.wait_for("getUpdates", 1)  # it holds the lease
        lease = redis_key(TOKEN.split(":")[0], "lease")
        self.assertEqual(1, (yield self.bus.execute("EXISTS", lease)))
        load = Load(api)
        yield load.when_accepted(200)
        self.assertGreater((yield self.bus.pending(AYS_GROUP)), 0)  # work in flight
        transport.signalProcess(signal.SIGTERM)
        code = yield proc.ended
        yield load.done
        output = proc.output.decode(errors="replace")
        self.assertEqual(0, code, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("cannot acknowledge", output)
        groups = yield self.groups_and_consumers()
        self.assertIn(("ckpt.alarm", AYS_GROUP), groups)
        self.assertEqual({key: {} for key in groups}, groups)  # no consumer left, so nothing pending either
        self.assertEqual(0, (yield self.bus.pending(AYS_GROUP)))
        self.assertEqual([], (yield self.bus.execute("KEYS", "ckpt.consumer.*")))
        self.assertEqual(0, (yield self.bus.execute("EXISTS", lease)))
        alarms = int((yield self.bus.execute("XLEN", "ckpt.alarm")))
        self.assertGreaterEqual(alarms, load.accepted)

    @inlineCallbacks
    def test_the_entries_of_a_killed_cockpit_are_taken_over_and_its_consumers_removed(self):
        taken_over: list[str] = []
        all_taken = Deferred()
        expected: list[int] = []

        def survivor_handler(event, delivery):
            if delivery.deliveries > 1:
                taken_over.append(event.guid)
                if expected and len(taken_over) == expected[0]:
                    all_taken.callback(None)

        # claim_idle far off: what the survivor gets, it gets through the dead one's heartbeat
        survivor_bus = RedisBus(RedisSection(url=self.redis.url, claim_idle=3600, consumer_timeout=1))
        survivor_bus.startService()
        self.addCleanup(survivor_bus.stopService)
        yield survivor_bus.when_connected()
        data = tempfile.mkdtemp()
        proc, transport = spawn_cockpit(self, data, f'[redis]\nurl = "{self.redis.url}"\nconsumer_timeout = 1.0\n'
                                                    f'claim_idle = 3600.0\n[ays]\nworkers = 1\n')
        port = yield proc.listening
        api = f"http://127.0.0.1:{port}/api"
        yield subscribe_a_slow_service(api)
        load = Load(api)
        yield load.when_accepted(100)
        transport.signalProcess("KILL")
        yield proc.ended
        yield load.done
        before = yield self.groups_and_consumers()
        dead = {name: pending for (stream, group), consumers in before.items() if group == AYS_GROUP
                for name, pending in consumers.items()}
        self.assertTrue(dead and sum(dead.values()) > 0, before)  # it died holding entries
        expected.append(sum(dead.values()))
        survivor = survivor_bus.consumer(AYS_GROUP, survivor_handler, name="survivor")
        survivor.startService()
        self.addCleanup(survivor.stopService)
        yield all_taken
        yield survivor.stopService()  # it acknowledges what it took over, and leaves
        after = yield self.groups_and_consumers()
        # the dead one was removed when its entries were taken over, the survivor on its way out
        self.assertEqual({}, {key: consumers for key, consumers in after.items() if key[1] == AYS_GROUP and consumers})
        self.assertEqual(0, (yield self.bus.pending(AYS_GROUP)))
