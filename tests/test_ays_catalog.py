"""The AYS catalog: one behaviour suite for both stores, then what only the Redis one shows."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cockpit.ays_catalog import Catalog
from cockpit.backends.embedded.catalog import DiskCatalogStore
from cockpit.backends.redis import RedisBus
from cockpit.backends.redis.catalog import CHANGES, IMPORTED, VERSION, RedisCatalogStore, service_key
from cockpit.config import RedisSection
from cockpit.repos import Conflict, Invalid, NotFound, RepoStore, ServiceRecord, Unavailable
from tests.redis_server import free_port, shared_server, started_bus

SCHEMA = "port = type:int default:22\n"
SERVICE = "events.email = notify\nrecurring.tick = 5m\n"
ACTIONS = textwrap.dedent('''
    def install(service, event):
        pass

    def notify(service, event):
        pass

    def tick(service, event):
        pass
''')
FILES = {"schema.hrd": SCHEMA, "service.hrd": SERVICE, "actions.py": ACTIONS}


class LogLines:
    """The log lines of one module's logger while a test runs."""

    def __init__(self, test: TestCase, namespace: str):
        self.namespace = namespace
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") == self.namespace:
            self.lines.append(formatEvent(event))

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


class CatalogBehaviour:
    """What every catalog store must do; subclasses say how to make one on ``self.base``."""

    timeout = 20

    def make_store(self):
        raise NotImplementedError

    @inlineCallbacks
    def start_catalog(self, store=None):
        catalog = Catalog(store or self.make_store(), reactor)
        catalog.startService()
        self.addCleanup(catalog.stopService)
        yield catalog.ready
        return catalog

    @inlineCallbacks
    def restarted(self):
        """The catalog stopped, and a new one on the same store's data, loaded."""
        yield self.catalog.stopService()
        return (yield self.start_catalog())

    @inlineCallbacks
    def setUp(self):
        self.base = Path(self.mktemp()).absolute()
        yield self.ready()
        self.catalog = yield self.start_catalog()

    def ready(self):
        return defer.succeed(None)

    @inlineCallbacks
    def make_demo(self, catalog=None, blueprint="node__web1:\n  port: 2222\nnode__web2: {}\n"):
        catalog = catalog or self.catalog
        yield catalog.create_repo("demo")
        yield catalog.put_template("demo", "node", FILES)
        yield catalog.add_blueprint("demo", "main", blueprint)
        return (yield catalog.prepare_blueprint("demo", "main"))

    @inlineCallbacks
    def test_repo_is_created_listed_and_deleted_and_a_second_create_is_a_conflict(self):
        summary = yield self.catalog.create_repo("env du-conv2")
        self.assertEqual((summary["name"], summary["templates"], summary["services"]), ("env du-conv2", [], []))
        yield self.assertFailure(self.catalog.create_repo("env du-conv2"), Conflict)
        self.assertEqual([r["name"] for r in self.catalog.list_repos()], ["env du-conv2"])
        catalog = yield self.restarted()
        self.assertEqual(catalog.repo_names(), ["env du-conv2"])
        yield catalog.delete_repo("env du-conv2")
        yield self.assertFailure(catalog.delete_repo("env du-conv2"), NotFound)
        self.assertRaises(NotFound, catalog.get_repo, "env du-conv2")
        self.catalog = catalog
        self.assertEqual((yield self.restarted()).repo_names(), [])

    @inlineCallbacks
    def test_template_is_created_then_replaced_and_its_files_read_back(self):
        yield self.catalog.create_repo("demo")
        template, created = yield self.catalog.put_template("demo", "node", FILES)
        self.assertEqual((template["actions"], template["events"], created),
                         (["install", "notify", "tick"], {"email": ["notify"]}, True))
        _, created = yield self.catalog.put_template("demo", "node", {"actions.py": ACTIONS})
        self.assertFalse(created)
        shown = yield self.catalog.get_template("demo", "node")
        self.assertEqual((shown["files"], shown["events"]), ({"actions.py": ACTIONS}, {}))
        catalog = yield self.restarted()
        self.assertEqual((yield catalog.get_template("demo", "node"))["files"], {"actions.py": ACTIONS})
        yield self.assertFailure(catalog.put_template("nowhere", "node", FILES), NotFound)

    @inlineCallbacks
    def test_broken_template_is_refused_with_why_and_nothing_is_stored(self):
        yield self.catalog.create_repo("demo")
        cases = [({"actions.py": "def x(:\n"}, "actions.py line 1"),
                 ({"service.hrd": "events.email = notify\n"}, "does not define"),
                 ({"other.txt": ""}, "unknown file 'other.txt'"),
                 ({"actions.py": "x = '\ud800'\n"}, "lone surrogate")]
        for files, message in cases:
            error = yield self.assertFailure(self.catalog.put_template("demo", "t", files), Invalid)
            self.assertIn(message, str(error))
        self.assertEqual(self.catalog.get_repo("demo")["templates"], [])
        yield self.assertFailure(self.catalog.get_template("demo", "t"), NotFound)

    @inlineCallbacks
    def test_blueprint_create_conflicts_replace_needs_one_and_resets_its_status(self):
        yield self.catalog.create_repo("demo")
        yield self.catalog.put_template("demo", "node", FILES)
        stored = yield self.catalog.add_blueprint("demo", "main", "node__a: {}\n")
        self.assertEqual((stored["name"], stored["state"]), ("main.yaml", "new"))
        yield self.assertFailure(self.catalog.add_blueprint("demo", "main.yaml", "node__b: {}\n"), Conflict)
        yield self.assertFailure(self.catalog.add_blueprint("demo", "other", "node__b: {}\n", create=False), NotFound)
        error = yield self.assertFailure(self.catalog.add_blueprint("demo", "bad", "a: [\n"), Invalid)
        self.assertIn("not valid YAML", str(error))
        yield self.catalog.prepare_blueprint("demo", "main")
        yield self.catalog.set_blueprint_status("demo", "main.yaml", {"state": "ok", "error": None, "executed": 5.0})
        yield self.catalog.add_blueprint("demo", "main", "node__c: {}\n", create=False)
        shown = yield self.catalog.get_blueprint("demo", "main")
        self.assertEqual((shown["content"], shown["state"]), ("node__c: {}\n", "new"))
        yield self.catalog.delete_blueprint("demo", "main")
        self.assertEqual(self.catalog.list_blueprints("demo"), [])
        yield self.assertFailure(self.catalog.get_blueprint("demo", "main"), NotFound)
        self.assertEqual((yield self.restarted()).list_blueprints("demo"), [])

    @inlineCallbacks
    def test_blueprint_makes_services_with_their_schema_defaults_and_keeps_its_status(self):
        services = yield self.make_demo()
        self.assertEqual([(s.key, s.args, s.states) for s in services],
                         [("node!web1", {"port": 2222}, {a: "new" for a in ("install", "notify", "tick")}),
                          ("node!web2", {"port": 22}, {a: "new" for a in ("install", "notify", "tick")})])
        self.assertEqual(self.catalog.list_blueprints("demo")[0]["state"], "running")
        yield self.catalog.set_blueprint_status("demo", "main.yaml", {"state": "ok", "error": None, "executed": 5.0})
        catalog = yield self.restarted()
        self.assertEqual(catalog.list_blueprints("demo"),
                         [{"name": "main.yaml", "repo": "demo", "state": "ok", "error": None, "executed": 5.0}])
        self.assertEqual(catalog.get_service("demo", "node!web1")["args"], {"port": 2222})

    @inlineCallbacks
    def test_blueprint_that_cannot_be_executed_keeps_its_error(self):
        yield self.catalog.create_repo("demo")
        yield self.catalog.add_blueprint("demo", "main", "nope__x: {}\n")
        error = yield self.assertFailure(self.catalog.prepare_blueprint("demo", "main"), Invalid)
        self.assertIn("no template 'nope'", str(error))
        [blueprint] = (yield self.restarted()).list_blueprints("demo")
        self.assertEqual(blueprint["state"], "error")
        self.assertIn("no template 'nope'", blueprint["error"])

    @inlineCallbacks
    def test_states_are_set_per_action_kept_by_a_blueprint_update_and_survive_a_restart(self):
        yield self.make_demo()
        yield defer.gatherResults([self.catalog.set_state("demo", "node!web1", "install", "ok"),
                                   self.catalog.set_state("demo", "node!web1", "notify", "error")])
        yield self.catalog.add_blueprint("demo", "main", "node__web1:\n  port: 1\n", create=False)
        yield self.catalog.prepare_blueprint("demo", "main")
        yield self.catalog.flush()
        catalog = yield self.restarted()
        service = catalog.get_service("demo", "node!web1")
        self.assertEqual((service["states"], service["args"]),
                         ({"install": "ok", "notify": "error", "tick": "new"}, {"port": 1}))
        self.assertGreaterEqual(service["updated"], service["created"])

    @inlineCallbacks
    def test_a_deleted_service_is_gone_and_a_state_set_for_it_later_brings_nothing_back(self):
        yield self.make_demo()
        yield self.catalog.delete_service("demo", "node!web2")
        yield self.catalog.set_state("demo", "node!web2", "install", "ok")
        yield self.assertFailure(self.catalog.delete_service("demo", "node!web2"), NotFound)
        yield self.catalog.flush()
        catalog = yield self.restarted()
        self.assertEqual(catalog.get_repo("demo")["services"], ["node!web1"])

    @inlineCallbacks
    def test_a_repo_made_anew_under_an_old_name_has_nothing_of_the_old_one(self):
        yield self.make_demo()
        yield self.catalog.delete_repo("demo")
        yield self.catalog.create_repo("demo")
        summary = (yield self.restarted()).get_repo("demo")
        self.assertEqual((summary["templates"], summary["services"], summary["blueprints"]), ([], [], {}))

    @inlineCallbacks
    def test_subscriptions_and_periods_come_from_the_services_templates(self):
        yield self.make_demo()
        self.assertEqual(sorted(s.service for s in self.catalog.subscribers("EMAIL")), ["node!web1", "node!web2"])
        self.assertEqual(sorted((s.service, s.action, p) for s, p in self.catalog.recurring()),
                         [("node!web1", "tick", 300.0), ("node!web2", "tick", 300.0)])
        yield self.catalog.put_template("demo", "node", {"actions.py": ACTIONS})
        self.assertEqual((self.catalog.subscribers("email"), self.catalog.recurring()), ([], []))

    @inlineCallbacks
    def test_a_workers_actions_file_holds_the_templates_actions(self):
        yield self.make_demo()
        template = self.catalog.repo("demo").templates["node"]
        self.assertEqual(template.actions_file.read_text(), ACTIONS)
        catalog = yield self.restarted()
        self.assertEqual(catalog.repo("demo").templates["node"].actions_file.read_text(), ACTIONS)

    def test_a_catalog_not_loaded_in_time_says_so(self):
        from cockpit.ays_catalog import LOAD_WAIT

        clock = Clock()
        catalog = Catalog(self.make_store(), clock)  # never started: never loaded
        self.assertRaises(Unavailable, catalog.repo_names)
        created, viewed = catalog.create_repo("demo"), catalog.view()
        self.assertNoResult(created)
        clock.advance(LOAD_WAIT)
        self.assertIn("still loading", str(self.failureResultOf(created, Unavailable).value))
        self.failureResultOf(viewed, Unavailable)

    @inlineCallbacks
    def test_a_change_asked_for_while_the_catalog_loads_waits_for_the_load(self):
        catalog = Catalog(self.make_store(), reactor)
        catalog.startService()
        self.addCleanup(catalog.stopService)
        repo = yield catalog.create_repo("early")  # asked before the first load is done
        self.assertEqual("early", repo["name"])
        self.assertEqual(["early"], (yield catalog.view()).repo_names())


class DiskCatalogTests(CatalogBehaviour, TestCase):
    def make_store(self):
        return DiskCatalogStore(self.base / "repos", reactor)

    @inlineCallbacks
    def test_the_disk_layout_is_that_of_design_section_7(self):
        yield self.make_demo()
        yield self.catalog.set_state("demo", "node!web1", "install", "ok")
        yield self.catalog.flush()
        repo = self.base / "repos" / "demo"
        self.assertEqual((repo / "servicetemplates" / "node" / "actions.py").read_text(), ACTIONS)
        self.assertEqual((repo / "blueprints" / "main.yaml").read_text(), "node__web1:\n  port: 2222\nnode__web2: {}\n")
        stored = json.loads((repo / "services" / "node!web1" / "service.json").read_text())
        self.assertEqual(stored["states"]["install"], "ok")
        self.assertEqual(json.loads((repo / ".ays").read_text())["blueprints"]["main.yaml"]["state"], "running")


    @inlineCallbacks
    def test_a_repo_is_created_at_the_second_of_the_catalog_clock(self):
        clock = Clock()
        clock.advance(1_700_000_321.5)
        catalog = Catalog(DiskCatalogStore(self.base / "dated", reactor), clock)
        catalog.startService()
        self.addCleanup(catalog.stopService)
        yield catalog.ready
        yield catalog.create_repo("demo")
        self.assertEqual(1_700_000_321.5, json.loads((self.base / "dated" / "demo" / ".ays").read_text())["created"])


class RedisCatalogTests(CatalogBehaviour, TestCase):
    @inlineCallbacks
    def ready(self):
        self.redis = shared_server()
        self.redis.flush()
        self.bus = yield started_bus(self, self.redis.url)

    def make_store(self, bus=None, base=None, **options):
        return RedisCatalogStore(bus or self.bus, (base or self.base) / "actions", reactor, **options)

    @inlineCallbacks
    def other(self, follow=False):
        """A second process's view: its own bus and data_dir; it follows the feed only when told to."""
        bus = yield started_bus(self, self.redis.url)
        catalog = Catalog(self.make_store(bus, Path(self.mktemp()).absolute()), reactor, follow=follow)
        catalog.startService()
        self.addCleanup(catalog.stopService)
        yield catalog.ready
        return catalog

    @inlineCallbacks
    def feed(self):
        entries = yield self.bus.execute("XRANGE", CHANGES, "-", "+")
        return [dict(zip(fields[::2], fields[1::2])) for _, fields in entries]

    @inlineCallbacks
    def test_every_change_makes_one_version_and_one_feed_entry_in_the_same_step(self):
        yield self.make_demo()
        yield self.catalog.set_state("demo", "node!web1", "install", "ok")
        yield self.catalog.delete_blueprint("demo", "main")
        entries = yield self.feed()
        self.assertEqual([(e["kind"], e["repo"], e["name"]) for e in entries],
                         [("repo", "demo", ""), ("template", "demo", "node"), ("blueprint", "demo", "main.yaml"),
                          ("service", "demo", "node!web1"), ("service", "demo", "node!web2"),
                          ("blueprint", "demo", "main.yaml"), ("service", "demo", "node!web1"),
                          ("blueprint", "demo", "main.yaml")])
        self.assertEqual([int(e["v"]) for e in entries], list(range(1, 9)))
        self.assertEqual((yield self.bus.execute("GET", VERSION)), "8")
        # refused changes change nothing
        yield self.assertFailure(self.catalog.create_repo("demo"), Conflict)
        yield self.assertFailure(self.catalog.add_blueprint("demo", "other", "node__x: {}\n", create=False), NotFound)
        self.assertEqual((yield self.bus.execute("GET", VERSION)), "8")

    @inlineCallbacks
    def test_an_action_state_is_a_hash_field_of_its_own(self):
        yield self.make_demo()
        yield self.catalog.set_state("demo", "node!web1", "install", "ok")
        fields = yield self.bus.execute("HGETALL", service_key("demo", "node!web1"))
        fields = dict(zip(fields[::2], fields[1::2]))
        self.assertEqual({k: v for k, v in fields.items() if k.startswith("state:")},
                         {"state:install": "ok", "state:notify": "new", "state:tick": "new"})
        self.assertEqual(json.loads(fields["record"])["args"], {"port": 2222})

    @inlineCallbacks
    def test_a_stale_copy_of_a_service_never_overwrites_its_states(self):
        yield self.make_demo()
        stale = ServiceRecord("demo", "node", "web1", "node", {"port": 3}, {"install": "new"}, 1.0, 1.0, "main.yaml")
        yield self.catalog.set_state("demo", "node!web1", "install", "ok")
        other = yield self.other()
        yield other.store.put_services("demo", [stale])
        yield other.sync()
        self.assertEqual(other.get_service("demo", "node!web1")["states"]["install"], "ok")
        self.assertEqual(other.get_service("demo", "node!web1")["args"], {"port": 3})

    @inlineCallbacks
    def test_another_process_sees_every_change_once_it_catches_up(self):
        other = yield self.other()
        yield self.make_demo()
        yield self.catalog.set_state("demo", "node!web1", "install", "ok")
        self.assertEqual(other.repo_names(), [])
        yield other.sync()
        self.assertEqual(other.get_repo("demo")["services"], ["node!web1", "node!web2"])
        self.assertEqual(other.get_service("demo", "node!web1")["states"]["install"], "ok")
        self.assertEqual(other.list_blueprints("demo")[0]["state"], "running")
        self.assertEqual(other.repo("demo").templates["node"].actions_file.read_text(), ACTIONS)
        self.assertNotEqual(other.repo("demo").templates["node"].actions_file.parent,
                            self.catalog.repo("demo").templates["node"].actions_file.parent)
        yield self.catalog.delete_repo("demo")
        yield self.catalog.create_repo("demo")
        yield other.sync()
        self.assertEqual((other.get_repo("demo")["templates"], other.get_repo("demo")["services"]), ([], []))
        self.assertEqual(other.reloads, 0)

    @inlineCallbacks
    def test_a_view_that_follows_the_feed_needs_no_one_to_ask(self):
        other = yield self.other(follow=True)
        yield self.catalog.create_repo("demo")
        yield self.catalog.put_template("demo", "node", FILES)
        yield other.when_caught_up(int((yield self.bus.execute("GET", VERSION))))
        self.assertEqual((other.get_repo("demo")["templates"], other.reloads), (["node"], 0))

    @inlineCallbacks
    def test_a_feed_trimmed_past_a_view_makes_it_load_everything_again(self):
        other = yield self.other()
        yield self.make_demo()
        yield self.bus.execute("XTRIM", CHANGES, "MAXLEN", "0")
        yield other.sync()
        self.assertEqual((other.reloads, other.get_repo("demo")["services"]), (1, ["node!web1", "node!web2"]))
        yield self.catalog.create_repo("next")
        yield other.sync()
        self.assertEqual((other.reloads, other.repo_names()), (1, ["demo", "next"]))

    @inlineCallbacks
    def test_a_redis_that_lost_its_data_makes_a_view_load_everything_again(self):
        other = yield self.other()
        yield self.make_demo()
        yield other.sync()
        self.redis.flush()
        yield self.catalog.create_repo("fresh")  # the writer catches up first: it finds the loss too
        yield other.sync()
        self.assertEqual((other.repo_names(), self.catalog.repo_names()), (["fresh"], ["fresh"]))
        self.assertEqual((other.reloads, self.catalog.reloads), (1, 1))

    @inlineCallbacks
    def test_a_state_written_here_is_not_replaced_by_an_older_one_read_back(self):
        yield self.make_demo()
        other = yield self.other()
        yield other.set_state("demo", "node!web1", "notify", "ok")  # a change for this view to read back
        written = self.catalog.set_state("demo", "node!web1", "install", "ok")  # sent in the next turn
        caught_up = self.catalog.sync()  # reads the service before the write above reaches Redis
        yield caught_up
        self.assertEqual(self.catalog.get_service("demo", "node!web1")["states"],
                         {"install": "ok", "notify": "ok", "tick": "new"})
        yield written
        yield other.sync()
        self.assertEqual(other.get_service("demo", "node!web1")["states"],
                         {"install": "ok", "notify": "ok", "tick": "new"})

    def test_a_catalog_that_cannot_be_loaded_says_why_and_tries_again(self):
        clock = Clock()
        unreachable = RedisBus(RedisSection(url=f"redis://127.0.0.1:{free_port()}/0"), clock=clock, reactor=reactor)
        catalog = Catalog(self.make_store(unreachable), clock)
        catalog.startService()
        self.addCleanup(catalog.stopService)
        health = catalog.health()
        self.assertEqual((health["ok"], health["loaded"]), (False, False))
        self.assertIn("is not running", health["error"])
        self.assertFalse(catalog.ready.called)
        clock.advance(1.0)  # it tries again, and fails again
        self.assertIn("is not running", catalog.health()["error"])
        self.assertRaises(Unavailable, catalog.repo_names)

    @inlineCallbacks
    def test_a_view_is_current_while_redis_cannot_be_asked(self):
        yield self.make_demo()
        yield self.bus.stopService()
        catalog = yield self.catalog.view()
        self.assertEqual(catalog.get_repo("demo")["services"], ["node!web1", "node!web2"])
        yield self.bus.startService()


class ImportTests(TestCase):
    """The first start with Redis over a repos directory of the embedded cockpit."""

    timeout = 20

    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()
        self.repos = Path(self.mktemp()).absolute()
        files = RepoStore(self.repos)
        for name in ("demo", "env du-conv2"):
            files.create_repo(name, created=1000.0)
        files.put_template("demo", "node", FILES)
        files.write_blueprint("demo", "main", "node__web1:\n  port: 2222\n", create=True)
        files.set_blueprint_status("demo", "main", {"state": "ok", "error": None, "executed": 1001.0})
        files.write_service(ServiceRecord("demo", "node", "web1", "node", {"port": 2222},
                                          {"install": "ok", "notify": "error"}, 1000.5, 1002.0, "main.yaml"))
        (self.repos / "demo" / "servicetemplates" / "broken").mkdir()
        (self.repos / "demo" / "servicetemplates" / "broken" / "actions.py").write_text("def x(:\n")
        self.log = LogLines(self, "cockpit.backends.redis.catalog")

    @inlineCallbacks
    def start(self, bus=None):
        bus = bus or (yield started_bus(self, self.redis.url))
        catalog = Catalog(RedisCatalogStore(bus, Path(self.mktemp()).absolute() / "actions", reactor,
                                            import_from=self.repos), reactor)
        catalog.startService()
        self.addCleanup(catalog.stopService)
        return catalog

    @inlineCallbacks
    def test_first_start_imports_every_repository_and_says_so_in_one_line(self):
        catalog = yield self.start()
        yield catalog.ready
        self.assertEqual(catalog.repo_names(), ["demo", "env du-conv2"])
        service = catalog.get_service("demo", "node!web1")
        self.assertEqual((service["states"], service["args"], service["created"], service["updated"]),
                         ({"install": "ok", "notify": "error"}, {"port": 2222}, 1000.5, 1002.0))
        self.assertEqual(catalog.list_blueprints("demo"),
                         [{"name": "main.yaml", "repo": "demo", "state": "ok", "error": None, "executed": 1001.0}])
        self.assertEqual(catalog.get_repo("demo")["created"], 1000.0)
        self.assertIn("actions.py line 1", catalog.get_repo("demo")["broken_templates"]["broken"])
        self.assertEqual((yield catalog.get_template("demo", "broken"))["files"], {"actions.py": "def x(:\n"})
        self.assertEqual(catalog.repo("demo").templates["node"].actions_file.read_text(), ACTIONS)
        [line] = self.log.matching("imported")
        self.assertEqual(line, f"AYS catalog: imported 2 repositories from {self.repos} into Redis; "
                               "that directory is no longer read")

    @inlineCallbacks
    def test_a_lone_process_never_takes_its_own_import_or_changes_for_another_processs(self):
        catalog_log = LogLines(self, "cockpit.ays_catalog")
        catalog = yield self.start()
        yield catalog.ready
        yield catalog.create_repo("later")
        yield catalog.put_template("later", "node", FILES)
        yield catalog.add_blueprint("later", "main", "node__web3: {}\n")
        yield catalog.prepare_blueprint("later", "main")
        yield catalog.delete_repo("env du-conv2")
        yield catalog.sync()
        again = yield self.start()  # restarted, on the same Redis
        yield again.ready
        yield again.create_repo("after the restart")
        yield again.sync()
        self.assertEqual((0, 0, []), (catalog.reloads, again.reloads, catalog_log.matching("again")))
        self.assertEqual(again.repo_names(), ["after the restart", "demo", "later"])

    @inlineCallbacks
    def test_after_the_import_the_directory_is_not_read_again(self):
        yield (yield self.start()).ready
        RepoStore(self.repos).create_repo("later", 1000.0)
        again = yield self.start()
        yield again.ready
        self.assertEqual(again.repo_names(), ["demo", "env du-conv2"])
        self.assertEqual(len(self.log.matching("imported")), 1)

    @inlineCallbacks
    def test_two_processes_starting_at_once_import_once(self):
        buses = yield defer.gatherResults([started_bus(self, self.redis.url) for _ in range(2)])
        catalogs = []
        for bus in buses:  # both start before either has loaded
            catalogs.append((yield self.start(bus)))
        yield defer.gatherResults([catalog.ready for catalog in catalogs])
        for catalog in catalogs:
            yield catalog.sync()
            self.assertEqual(catalog.repo_names(), ["demo", "env du-conv2"])
        self.assertEqual(len(self.log.matching("imported 2 repositories")), 1)
        entries = yield buses[0].execute("XRANGE", CHANGES, "-", "+")
        self.assertEqual([dict(zip(f[::2], f[1::2]))["kind"] for _, f in entries], ["catalog"])
        self.assertEqual(len((yield buses[0].execute("HKEYS", IMPORTED))), 1)

    @inlineCallbacks
    def test_a_repository_redis_has_already_is_left_as_it_is_and_the_log_says_so(self):
        first = yield self.start()
        yield first.ready
        yield first.delete_repo("env du-conv2")
        yield first.create_repo("env du-conv2")  # made with Redis: that one is kept
        yield first.store.bus.execute("DEL", IMPORTED)  # as if this directory had never been imported
        again = yield self.start()
        yield again.ready
        self.assertEqual(again.get_repo("env du-conv2")["created"], first.get_repo("env du-conv2")["created"])
        self.assertEqual(again.get_repo("demo")["services"], ["node!web1"])
        skipped = self.log.matching("was not imported")
        self.assertEqual(len(skipped), 2)
        self.assertIn("repository env du-conv2 under", skipped[1])
        self.assertIn("Redis holds a repository of that name already; its files stay where they are", skipped[1])
