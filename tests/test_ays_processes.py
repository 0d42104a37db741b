"""Two cockpits on one Redis, in one test process: each its own bus, data_dir, catalog view and robot.

The second one's view never follows the feed by itself here (``follow=False``): whatever it
knows of the first one's changes, it learnt when its consumer or its REST API asked.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import treq
from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from cockpit import config
from cockpit.ays import Robot
from cockpit.ays_api import AysApi
from cockpit.ays_catalog import Catalog
from cockpit.backends.redis.catalog import RedisCatalogStore, service_key
from cockpit.events import AlarmEvent, GenericEvent
from cockpit.repos import ServiceRecord
from cockpit.backends.embedded.runs import SqliteRunHistory
from cockpit.web import Api
from cockpit.workers import WorkerPool
from tests.redis_server import RedisServer, shared_server, started_bus

SCHEMA = "release = type:str default:''\n"
SERVICE = "events.alarm = notify\n"
ACTIONS = textwrap.dedent('''
    import os, time

    def install(service, event):
        release = service.args["release"]
        while release and not os.path.exists(release):
            time.sleep(0.01)

    def notify(service, event):
        service.log("notified of", event.type)

    def tick(service, event):
        pass

    def tock(service, event):
        pass
''')


@inlineCallbacks
def handled(robot, publish, event):
    """Publish ``event`` through ``publish`` and fire with the runs ``robot`` recorded for it, once its
    consumer has handled it (an entry is acknowledged only once its runs are recorded)."""
    done = robot.consumer.when_handled(robot.consumer.handled + 1)
    yield publish(event)
    yield done
    runs = yield robot.list_runs(event_guid=event.guid)
    return [(run["action"], run["state"], run["repo"], run["service"]) for run in runs]


class TwoCockpits(TestCase):
    timeout = 40

    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()

    @inlineCallbacks
    def cockpit(self, url=None, follow=True, start=True):
        """One cockpit's AYS; not started when ``start`` is False (its catalog, then its robot, start it)."""
        bus = yield started_bus(self, url=url or self.redis.url)
        base = Path(self.mktemp()).absolute()
        catalog = Catalog(RedisCatalogStore(bus, base / "actions", reactor), reactor, follow=follow)
        robot = Robot(catalog, bus, SqliteRunHistory(base / "runs.sqlite", reactor),
                      WorkerPool(1, action_timeout=10.0, reactor=reactor), clock=reactor)
        self.addCleanup(lambda: catalog.running and catalog.stopService())
        self.addCleanup(lambda: robot.running and robot.stopService())
        if start:
            catalog.startService()
            robot.startService()
            yield robot.ready
        return robot

    @inlineCallbacks
    def make_demo(self, robot, release=""):
        """Through ``robot``: a repo, a template and a blueprint, executed; fires once the install is done."""
        yield robot.catalog.create_repo("demo")
        yield robot.catalog.put_template("demo", "node", {"schema.hrd": SCHEMA, "service.hrd": SERVICE,
                                                          "actions.py": ACTIONS})
        yield robot.catalog.add_blueprint("demo", "main", f"node__web1:\n  release: '{release}'\n")
        _, finished = yield robot.execute_blueprint("demo", "main")
        return finished

    @inlineCallbacks
    def serve(self, robot):
        """``robot``'s REST API on a free port; fires with its base URL."""
        api = Api(config.from_dict({}), robot.bus, clock=reactor)
        api.include(AysApi(robot, robot.catalog))
        port = reactor.listenTCP(0, api.site(reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        return f"http://127.0.0.1:{port.getHost().port}"
        yield

    @inlineCallbacks
    def get(self, url):
        response = yield treq.get(url, pool=self.pool)
        return response.code, (yield response.json())

    @inlineCallbacks
    def test_a_repo_template_and_blueprint_made_through_one_are_served_and_used_by_the_other_at_once(self):
        first = yield self.cockpit()
        other = yield self.cockpit(follow=False)
        base = yield self.serve(other)
        installed = yield self.make_demo(first)
        [install] = yield installed
        self.assertEqual(install.state, "ok")
        yield first.stopService()  # from here on only the other reads events
        event = AlarmEvent(service="node!web1", method="check", msg="disk full")
        runs = yield handled(other, first.bus.publish, event)
        self.assertEqual(runs, [("notify", "ok", "demo", "node!web1")])
        [run] = yield other.list_runs(event_guid=event.guid)
        self.assertIn("notified of alarm", run["log"])
        yield first.catalog.put_template("demo", "node", {"actions.py": ACTIONS})  # no more subscriptions
        code, service = yield self.get(f"{base}/api/repos/demo/services/node/web1")
        self.assertEqual((code, service["states"], service["events"]),
                         (200, {"install": "ok", "notify": "ok", "tick": "new", "tock": "new"}, {}))

    @inlineCallbacks
    def test_a_change_made_while_the_other_starts_is_in_force_before_its_first_event(self):
        first = yield self.cockpit()
        other = yield self.cockpit(follow=False, start=False)
        other.catalog.startService()  # its load is on its way ...
        other.startService()
        installed = yield self.make_demo(first)  # ... while this is made
        yield installed
        yield other.ready
        yield first.stopService()
        event = AlarmEvent(service="node!web1", method="check", msg="right after the start")
        runs = yield handled(other, first.bus.publish, event)
        self.assertEqual(runs, [("notify", "ok", "demo", "node!web1")])

    @inlineCallbacks
    def test_concurrent_state_updates_from_both_never_leave_a_stale_state(self):
        first = yield self.cockpit()
        other = yield self.cockpit(follow=False)
        release = Path(self.mktemp()).absolute()
        installed = yield self.make_demo(first, release=str(release))
        yield other.catalog.sync()  # its view: the install not done yet
        self.assertIn(other.catalog.get_service("demo", "node!web1")["states"]["install"], ("new", "running"))
        release.write_text("go")
        [install] = yield installed
        self.assertEqual(install.state, "ok")
        # both run actions of the same service at once, the other from its stale view
        runs = [first.run_action("demo", "node!web1", "tick")[1] for _ in range(5)]
        runs += [other.run_action("demo", "node!web1", "tock")[1] for _ in range(5)]
        done = yield defer.gatherResults(runs)
        self.assertEqual({run.state for run in done}, {"ok"})
        yield defer.gatherResults([first.catalog.flush(), other.catalog.flush()])
        fields = yield first.bus.execute("HGETALL", service_key("demo", "node!web1"))
        fields = dict(zip(fields[::2], fields[1::2]))
        self.assertEqual({k: v for k, v in fields.items() if k.startswith("state:")},
                         {"state:install": "ok", "state:notify": "new", "state:tick": "ok", "state:tock": "ok"})
        for robot in (first, other):
            yield robot.catalog.sync()
            self.assertEqual(robot.catalog.get_service("demo", "node!web1")["states"],
                             {"install": "ok", "notify": "new", "tick": "ok", "tock": "ok"})

    @inlineCallbacks
    def blip_setup(self):
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        first = yield self.cockpit(url=server.url)
        other = yield self.cockpit(url=server.url, follow=False)
        yield (yield self.make_demo(first))
        yield first.stopService()  # only the other reads events
        yield other.catalog.sync()
        return server, first, other

    @inlineCallbacks
    def blip(self, server, *robots):
        server.stop()
        yield defer.gatherResults([robot.bus.when_disconnected() for robot in robots])
        server.start()
        yield defer.gatherResults([robot.bus.when_connected() for robot in robots])

    @inlineCallbacks
    def test_a_change_made_right_after_a_redis_restart_is_in_force_before_the_next_event(self):
        server, first, other = yield self.blip_setup()
        server.command("CONFIG", "SET", "save", "3600 1")  # it saves its data as it stops, and reads it back
        yield self.blip(server, first, other)
        files = {"schema.hrd": SCHEMA, "service.hrd": "events.alarm = notify\nevents.generic = tick\n",
                 "actions.py": ACTIONS}
        yield first.catalog.put_template("demo", "node", files)
        runs = yield handled(other, first.bus.publish, GenericEvent(tags=["after the blip"]))
        self.assertEqual(runs, [("tick", "ok", "demo", "node!web1")])
        self.assertEqual(other.catalog.reloads, 0)

    @inlineCallbacks
    def test_a_change_made_right_after_redis_lost_its_data_is_in_force_before_the_next_event(self):
        server, first, other = yield self.blip_setup()
        yield self.blip(server, first, other)  # without persistence: everything is gone
        yield first.catalog.create_repo("fresh")
        yield first.catalog.put_template("fresh", "node", {"service.hrd": "events.alarm = tick\n",
                                                           "actions.py": ACTIONS})
        yield first.catalog.put_services("fresh", [ServiceRecord("fresh", "node", "n1", "node", {"release": ""})])
        runs = yield handled(other, first.bus.publish, AlarmEvent(service="node!n1", method="check", msg="lost"))
        self.assertEqual(runs, [("tick", "ok", "fresh", "node!n1")])
        self.assertEqual((other.catalog.reloads, other.catalog.repo_names()), (1, ["fresh"]))


class ServedTests(TestCase):
    """What one cockpit's REST API shows of a change made through the other, at once."""

    timeout = 20

    @inlineCallbacks
    def test_repos_made_through_one_are_listed_by_the_others_api_at_once(self):
        redis = shared_server()
        redis.flush()
        catalogs = []
        for _ in range(2):
            bus = yield started_bus(self, url=redis.url)
            catalog = Catalog(RedisCatalogStore(bus, Path(self.mktemp()).absolute(), reactor), reactor, follow=False)
            catalog.startService()
            self.addCleanup(catalog.stopService)
            yield catalog.ready
            catalogs.append(catalog)
        api = Api(config.from_dict({}), catalogs[1].store.bus, clock=reactor)
        api.include(AysApi(None, catalogs[1]))
        port = reactor.listenTCP(0, api.site(reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        for name in ("alpha", "beta"):
            yield catalogs[0].create_repo(name)
            response = yield treq.get(f"http://127.0.0.1:{port.getHost().port}/api/repos", pool=pool)
            listed = json.loads((yield response.text()))
            self.assertEqual(listed["repos"][-1]["name"], name)
