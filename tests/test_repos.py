"""The repository model on disk (docs/design.md §7)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.trial.unittest import TestCase

from cockpit import repos
from cockpit.repos import Conflict, Invalid, NotFound, RepoStore

SCHEMA = "port = type:int default:22\nname = type:str required\n"
SERVICE = "events.email =\n    notify,\n    escalate,\nrecurring.monitor = 5m\n"
ACTIONS = ("def install(service, event):\n    pass\n\ndef notify(service, event):\n    pass\n\n"
           "def escalate(service, event):\n    pass\n\ndef monitor(service, event):\n    pass\n"
           "\ndef _private():\n    pass\n")
FILES = {"schema.hrd": SCHEMA, "service.hrd": SERVICE, "actions.py": ACTIONS}


class RepoStoreTests(TestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.store = RepoStore(self.root)
        self.store.create_repo("demo", 1700000000.0)

    def test_repo_layout_on_disk(self):
        self.store.put_template("demo", "node", FILES)
        self.store.write_blueprint("demo", "main", "node__web1:\n  name: w\n", create=True)
        base = self.root / "demo"
        self.assertTrue((base / ".ays").is_file())
        for name in FILES:
            self.assertEqual((base / "servicetemplates" / "node" / name).read_text(), FILES[name])
        self.assertTrue((base / "blueprints" / "main.yaml").is_file())
        self.assertEqual(self.store.list_repos(), ["demo"])

    def test_seed_repo_name_with_a_space_is_accepted(self):
        self.store.create_repo("env du-conv2", 1700000000.0)
        self.assertIn("env du-conv2", self.store.list_repos())

    def test_creating_a_repo_twice_is_a_conflict(self):
        self.assertRaises(Conflict, self.store.create_repo, "demo", 1700000000.0)

    def test_names_that_would_escape_the_root_are_refused(self):
        for name in ("..", "../x", "a/b", ".hidden", "", "x" * 65, "trailing "):
            self.assertRaises(Invalid, self.store.create_repo, name, 1700000000.0)
        self.assertRaises(Invalid, self.store.put_template, "demo", "../../etc", FILES)
        self.assertRaises(Invalid, self.store.write_blueprint, "demo", "../x.yaml", "a__b: {}", True)
        self.assertRaises(Invalid, self.store.service_path, "demo", "../x!y")
        self.assertEqual(sorted(os.listdir(self.root)), ["demo"])

    def test_symlinked_repo_leading_outside_is_refused(self):
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        os.symlink(outside, self.root / "link")
        self.assertRaises(Invalid, self.store.repo_path, "link")

    def test_template_load_gives_actions_events_periods_and_schema(self):
        template, created = self.store.put_template("demo", "node", FILES)
        self.assertTrue(created)
        self.assertEqual(template.actions, ("install", "notify", "escalate", "monitor"))
        self.assertEqual(template.spec.events, {"email": ("notify", "escalate")})
        self.assertEqual(template.spec.recurring, {"monitor": 300.0})
        self.assertEqual(self.store.put_template("demo", "node", FILES)[1], False)
        snapshot = self.store.load_repo("demo")
        self.assertEqual(snapshot.templates["node"].actions, template.actions)

    def test_template_put_replaces_files_not_given(self):
        self.store.put_template("demo", "node", FILES)
        self.store.put_template("demo", "node", {"actions.py": ACTIONS})
        self.assertEqual(self.store.read_template_files("demo", "node"), {"actions.py": ACTIONS})

    def test_broken_template_files_are_refused_and_nothing_is_written(self):
        bad = [({"actions.py": "def x(:\n"}, "actions.py line 1"),
               ({"service.hrd": "events.email = notify\n"}, "does not define"),
               ({"schema.hrd": "a = type:nope\n"}, "schema.hrd: a: unknown type"),
               ({"other.txt": ""}, "unknown file 'other.txt'"),
               ({"actions.py": 3}, "expected the file's text")]
        for files, message in bad:
            self.assertIn(message, str(self.assertRaises(Invalid, self.store.put_template, "demo", "t", files)))
        self.assertFalse((self.root / "demo" / "servicetemplates" / "t").exists())

    def test_blueprint_create_conflicts_update_needs_existing(self):
        self.assertEqual(self.store.write_blueprint("demo", "main", "a__b: {}\n", create=True), "main.yaml")
        self.assertRaises(Conflict, self.store.write_blueprint, "demo", "main.yaml", "a__b: {}\n", True)
        self.assertRaises(NotFound, self.store.write_blueprint, "demo", "other", "a__b: {}\n", False)
        self.store.write_blueprint("demo", "main.yaml", "a__c: {}\n", create=False)
        self.assertEqual(self.store.read_blueprint("demo", "main"), "a__c: {}\n")
        self.store.delete_blueprint("demo", "main")
        self.assertRaises(NotFound, self.store.read_blueprint, "demo", "main")

    def test_service_record_round_trips_and_writes_atomically(self):
        record = repos.ServiceRecord("demo", "node", "web1", "node", {"port": 22}, {"install": "ok"}, 1.0, 2.0)
        self.store.write_service(record)
        path = self.root / "demo" / "services" / "node!web1"
        self.assertEqual(json.loads((path / "service.json").read_text())["states"], {"install": "ok"})
        self.assertEqual([p.name for p in path.iterdir()], ["service.json"])  # no temporary files left
        self.assertEqual(self.store.load_repo("demo").services["node!web1"].args, {"port": 22})
        self.store.delete_service("demo", "node!web1")
        self.assertRaises(NotFound, self.store.delete_service, "demo", "node!web1")

    def test_deleting_a_repo_removes_it(self):
        self.store.delete_repo("demo")
        self.assertEqual(self.store.list_repos(), [])
        self.assertRaises(NotFound, self.store.load_repo, "demo")


class BlueprintParseTests(TestCase):
    def test_blocks_are_kept_in_file_order(self):
        entries = repos.parse_blueprint("node__z:\n  a: 1\nnode__a:\napp__web__1: {x: y}\n")
        self.assertEqual([(e.template, e.instance, e.args) for e in entries],
                         [("node", "z", {"a": 1}), ("node", "a", {}), ("app", "web__1", {"x": "y"})])

    def test_bad_blueprints_say_what_is_wrong(self):
        cases = [("", "empty"), ("- a\n", "mapping of"), ("node: {}\n", "expected template__instance"),
                 ("node__a: [1]\n", "must be a mapping"), ("a: [\n", "not valid YAML at line")]
        for content, message in cases:
            self.assertIn(message, str(self.assertRaises(Invalid, repos.parse_blueprint, content)))

    def test_blueprint_nested_too_deeply_is_invalid(self):
        error = self.assertRaises(Invalid, repos.parse_blueprint, "node__a: {x: " + "[" * 5000 + "]" * 5000 + "}")
        self.assertEqual("the blueprint nests lists and mappings too deeply", str(error))

    def test_names_with_a_trailing_newline_are_refused(self):
        self.assertRaises(Invalid, repos.check_repo_name, "demo\n")
        self.assertRaises(Invalid, repos.check_name, "web1\n", "instance")
        self.assertRaises(Invalid, repos.blueprint_name, "main.yaml\n")
        self.assertEqual("main.yaml", repos.blueprint_name("main"))

    def test_actions_python_cannot_parse_are_invalid_with_a_sentence(self):
        error = self.assertRaises(Invalid, repos.action_names, "def install(service, event):\x00\n    pass\n")
        self.assertEqual("actions.py: source code string cannot contain null bytes", str(error))
        error = self.assertRaises(Invalid, repos.action_names, "x = " + "+".join(["1"] * 300000))
        self.assertEqual("actions.py nests its code too deeply for Python to parse", str(error))

    def test_services_get_schema_defaults_and_missing_required_is_an_error(self):
        store = RepoStore(Path(self.mktemp()))
        store.create_repo("demo", 1700000000.0)
        template, _ = store.put_template("demo", "node", FILES)
        entries = repos.parse_blueprint("node__web1:\n  name: w\n")
        [record] = repos.blueprint_services("demo", "main.yaml", entries, {"node": template}, {}, 5.0)
        self.assertEqual((record.key, record.args), ("node!web1", {"port": 22, "name": "w"}))
        self.assertEqual(record.states["install"], "new")
        error = self.assertRaises(Invalid, repos.blueprint_services, "demo", "main.yaml",
                                  repos.parse_blueprint("node__web2: {}\n"), {"node": template}, {}, 5.0)
        self.assertEqual(str(error), "blueprint block node__web2: argument 'name' is required")
        error = self.assertRaises(Invalid, repos.blueprint_services, "demo", "main.yaml",
                                  repos.parse_blueprint("nope__x: {}\n"), {"node": template}, {}, 5.0)
        self.assertIn("no template 'nope'", str(error))
