"""Hostile bodies through the real HTTP interface: YAML bombs, values the bus could not hand back, bad guids.

Each one gets a 400 that says what and where, and nothing reaches the bus or the disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from cockpit import config
from cockpit.ays import Robot
from cockpit.ays_api import AysApi
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.embedded.runs import SqliteRunHistory
from cockpit.web import Api
from cockpit.workers import WorkerPool
from tests.wiring import disk_catalog


def alias_bomb(levels: int, key: str = "a") -> str:
    """Nested anchors, nine aliases a level: 9**levels values once expanded, a few hundred bytes of text."""
    lines = [f"{key}0: &{key}0 [x,x,x,x,x,x,x,x,x]"]
    for level in range(1, levels + 1):
        aliases = ",".join([f"*{key}{level - 1}"] * 9)
        lines.append(f"{key}{level}: &{key}{level} [{aliases}]")
    return "\n".join(lines) + "\n"


class _Site:
    """An Api with the AYS routes (robot, one real worker) on a free loopback port."""

    @inlineCallbacks
    def start_site(self, test: TestCase):
        base = Path(test.mktemp()).absolute()
        self.data = base
        self.bus = MemoryBus(clock=reactor)
        self.bus.startService()
        test.addCleanup(self.bus.stopService)
        self.robot = Robot(disk_catalog(base / "repos"), self.bus, SqliteRunHistory(base / "runs.sqlite", reactor),
                           WorkerPool(1, action_timeout=5.0, reactor=reactor), clock=reactor)
        self.robot.startService()
        test.addCleanup(self.robot.stopService)
        yield self.robot.ready
        self.published = []
        self.bus.subscribe(self.published.append)
        api = Api(config.from_dict({}), self.bus, clock=reactor)
        api.include(AysApi(self.robot))
        port = reactor.listenTCP(0, api.site(reactor), interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @inlineCallbacks
    def send(self, path: str, body: bytes, content_type: str = "application/json", method: str = "POST"):
        response = yield treq.request(method, self.base + path, data=body, pool=self.pool,
                                      headers={"Content-Type": [content_type]})
        text = yield response.text()
        return response.code, json.loads(text) if text else None


class EventBodyTests(TestCase, _Site):
    timeout = 30

    def setUp(self):
        return self.start_site(self)

    @inlineCallbacks
    def refused(self, event_type: str, body: str, content_type: str, *fragments: str):
        code, reply = yield self.send(f"/api/events/{event_type}", body.encode("utf-8", "surrogatepass"),
                                      content_type)
        self.assertEqual(400, code, reply)
        for fragment in fragments:
            self.assertIn(fragment, reply["error"])
        self.assertEqual([], self.published)
        return reply["error"]

    @inlineCallbacks
    def test_yaml_alias_bomb_is_400_at_once(self):
        bomb = "args:\n" + "".join("  " + line + "\n" for line in alias_bomb(9).splitlines())
        self.assertLess(len(bomb), 500)
        yield self.refused("generic", bomb, "application/yaml", "aliases expand it by more than")
        # one level more froze the process for good: now it is the same refusal, as quickly
        yield self.refused("generic", "args:\n" + "".join("  " + line + "\n" for line in alias_bomb(10).splitlines()),
                           "application/yaml", "aliases expand it by more than")

    @inlineCallbacks
    def test_one_long_text_aliased_many_times_is_400(self):
        # few values, but each alias stands for 100 KB of text: 2000 of them would be 200 MB of JSON
        bomb = "args:\n  t: &t '" + "x" * 100_000 + "'\n  many: [" + ",".join(["*t"] * 2000) + "]\n"
        yield self.refused("generic", bomb, "application/yaml", "aliases expand it by more than")

    @inlineCallbacks
    def test_a_few_shared_nodes_are_fine_and_read_back_expanded(self):
        code, reply = yield self.send("/api/events/generic",
                                      b"args:\n  base: &b {x: 1}\n  one: *b\n  two: {<<: *b, y: 2}\n",
                                      "application/yaml")
        self.assertEqual(202, code, reply)
        self.assertEqual({"base": {"x": 1}, "one": {"x": 1}, "two": {"x": 1, "y": 2}}, self.published[0].args)

    @inlineCallbacks
    def test_recursive_yaml_alias_is_400(self):
        yield self.refused("generic", "args: &a {x: *a}\n", "application/yaml", "recursive alias")

    @inlineCallbacks
    def test_lone_surrogate_in_any_field_is_400_naming_it(self):
        yield self.refused("alarm", '{"service": "node!web1", "msg": "\\ud800"}', "application/json",
                           "msg:", "lone surrogate")
        yield self.refused("generic", '{"args": {"deep": [{"s": "a\\udfffb"}]}}', "application/json",
                           "args.deep[0].s:", "lone surrogate")

    @inlineCallbacks
    def test_integer_too_long_to_read_back_is_400_naming_it(self):
        yield self.refused("generic", '{"args": {"n": ' + "7" * 4301 + "}}", "application/json",
                           "args.n:", "4301 digits")
        yield self.refused("alarm", "service: node!web1\nepoch: " + "9" * 5000 + "\n", "application/yaml",
                           "epoch:", "4300 digits")
        yield self.refused("alarm", '{"service": "node!web1", "epoch": 1' + "0" * 30 + "}", "application/json",
                           "epoch:")

    @inlineCallbacks
    def test_yaml_timestamp_that_is_no_date_is_400_naming_it(self):
        yield self.refused("alarm", "service: node!web1\nepoch: 2001-13-45\n", "application/yaml",
                           "epoch:", "not a valid date")
        yield self.refused("generic", "args: {when: 2001-13-45}\n", "application/yaml", "args.when:")

    @inlineCallbacks
    def test_a_real_yaml_date_is_kept_as_its_text(self):
        code, reply = yield self.send("/api/events/generic", b"args: {when: 2001-12-14}\n", "application/yaml")
        self.assertEqual(202, code, reply)
        self.assertEqual({"when": "2001-12-14"}, self.published[0].args)

    @inlineCallbacks
    def test_yaml_sexagesimal_integer_too_long_is_400_not_a_lost_event(self):
        yield self.refused("generic", "args: {n: " + ":".join(["59"] * 3000) + "}\n", "application/yaml",
                           "args.n:", "4300 digits")

    @inlineCallbacks
    def test_nan_and_infinity_are_400_naming_the_field(self):
        yield self.refused("generic", '{"args": {"n": NaN}}', "application/json", "args.n:", "NaN")
        yield self.refused("generic", '{"args": {"n": 1e400}}', "application/json", "args.n:", "finite")
        yield self.refused("generic", "args: {n: .inf}\n", "application/yaml", "args.n:", "finite")

    @inlineCallbacks
    def test_yaml_tags_outside_json_are_400(self):
        yield self.refused("generic", "args: {b: !!binary aGVsbG8=}\n", "application/yaml", "args.b:", "!!binary")
        yield self.refused("generic", "args: {on: 1}\n", "application/yaml", "quote it")

    @inlineCallbacks
    def test_guid_that_is_no_token_is_400(self):
        error = yield self.refused("alarm", json.dumps({"service": "node!web1",
                                                        "guid": "abc\ndata: injected\n\nevent: evil"}),
                                   "application/json", "guid:")
        self.assertNotIn("\n", error)
        for guid in ("a b", "x" * 101, "-lead", "a/b", "é"):
            yield self.refused("alarm", json.dumps({"service": "node!web1", "guid": guid}), "application/json",
                               "guid:")
        for guid in ("762d6f24-8b50-4e46-8cb6-fa6d0f56f1fd", "0f0e4b7c9a2d4c1e8f3a5b6c7d8e9f00", "eco.42:a_b-c"):
            code, reply = yield self.send("/api/events/alarm", json.dumps({"service": "node!web1", "guid": guid}).encode())
            self.assertEqual((202, guid), (code, reply["guid"]))


class BlueprintBodyTests(TestCase, _Site):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        yield self.start_site(self)
        code, _ = yield self.send("/api/repos", b'{"name": "demo"}')
        self.assertEqual(201, code)
        template = {"files": {"actions.py": "def install(service, event):\n    pass\n"}}
        code, _ = yield self.send("/api/repos/demo/templates/mailbox", json.dumps(template).encode(), method="PUT")
        self.assertEqual(201, code)

    @inlineCallbacks
    def store(self, content: str):
        return (yield self.send("/api/repos/demo/blueprints",
                                json.dumps({"name": "main.yaml", "content": content}).encode()))

    def assertNothingStored(self):
        self.assertFalse((self.data / "repos" / "demo" / "blueprints" / "main.yaml").exists())
        self.assertEqual([], list((self.data / "repos" / "demo" / "services").iterdir()))

    @inlineCallbacks
    def test_alias_bomb_blueprint_is_refused_when_stored(self):
        bomb = "mailbox__ops:\n" + "".join("  " + line + "\n" for line in alias_bomb(9, "b").splitlines())
        self.assertLess(len(bomb), 500)
        code, reply = yield self.store(bomb)
        self.assertEqual(400, code, reply)
        self.assertIn("aliases expand it", reply["error"])
        self.assertNothingStored()

    @inlineCallbacks
    def test_recursive_alias_blueprint_is_refused_when_stored(self):
        code, reply = yield self.store("mailbox__ops: &a {x: *a}\n")
        self.assertEqual(400, code, reply)
        self.assertIn("recursive alias", reply["error"])
        self.assertNothingStored()

    @inlineCallbacks
    def test_blueprint_size_services_and_args_are_bounded(self):
        from cockpit import repos

        code, reply = yield self.store("mailbox__ops: {note: '" + "x" * repos.MAX_BLUEPRINT + "'}\n")
        self.assertEqual(400, code)
        self.assertIn(f"larger than {repos.MAX_BLUEPRINT} bytes", reply["error"])
        code, reply = yield self.store("".join(f"mailbox__s{i}: {{}}\n" for i in range(repos.MAX_SERVICES + 1)))
        self.assertEqual(400, code)
        self.assertIn(f"at most {repos.MAX_SERVICES}", reply["error"])
        # shared nodes that stay within the alias bound can still make big arguments: bounded too
        many = "mailbox__ops:\n  a: &a '" + "y" * 1000 + "'\n  b: [" + ", ".join(["*a"] * 100) + "]\n"
        code, reply = yield self.store(many)
        self.assertEqual(400, code, reply)
        self.assertIn(f"at most {repos.MAX_ARGS}", reply["error"])
        self.assertNothingStored()

    @inlineCallbacks
    def test_a_bounded_blueprint_is_stored_and_executes(self):
        code, reply = yield self.store("mailbox__ops: {note: &n hello, again: *n}\n")
        self.assertEqual(201, code, reply)
        code, reply = yield self.send("/api/repos/demo/blueprints/main.yaml/execute", b"")
        self.assertEqual(202, code, reply)
        yield self.robot.when_recorded(reply["runs"][0]["id"])
        code, service = yield self.send("/api/repos/demo/services/mailbox/ops", b"", method="GET")
        self.assertEqual({"note": "hello", "again": "hello"}, service["args"])
        self.assertEqual("ok", service["states"]["install"])
