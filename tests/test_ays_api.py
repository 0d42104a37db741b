"""The AYS REST routes over a real port, with a real robot and worker processes."""
from __future__ import annotations

import json
import re
import textwrap
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
from cockpit.runs import DONE_STATES
from cockpit.web import Api
from cockpit.workers import WorkerPool
from tests.wiring import disk_catalog

SERVICE_HRD = "events.email =\n    notify,\n    escalate,\n"
SCHEMA_HRD = "port = type:int default:22\n"
ACTIONS = textwrap.dedent('''
    def install(service, event):
        service.log("installed with port", service.args["port"])

    def notify(service, event):
        service.log("notify", event.subject if event.type == "email" else event.args)
        return event.args if event.type == "generic" else None

    def escalate(service, event):
        pass

    def measure(service, event):
        return {"nan": float("nan"), "inf": float("inf"), "fine": 1.5}
''')


def strict_json(text):
    """JSON as RFC 8259 has it: NaN and Infinity, which Python's json reads, are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


class AysApiTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        self.bus = MemoryBus(clock=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.robot = Robot(disk_catalog(base / "repos"), self.bus, SqliteRunHistory(base / "runs.sqlite", reactor),
                           WorkerPool(1, action_timeout=5.0, reactor=reactor), clock=reactor)
        self.robot.startService()
        self.addCleanup(self.robot.stopService)
        yield self.robot.ready
        self.api = Api(config.from_dict({}), self.bus, clock=reactor)
        self.api.include(AysApi(self.robot))
        port = reactor.listenTCP(0, self.api.site(reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @inlineCallbacks
    def call(self, method, path, body=None, expect=None):
        kwargs = {"pool": self.pool}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": ["application/json"]}
        response = yield treq.request(method, self.base + path, **kwargs)
        text = yield response.text()
        payload = strict_json(text) if text else None
        if expect is not None:
            self.assertEqual(response.code, expect, payload)
        return response.code, payload

    @inlineCallbacks
    def setup_demo(self):
        yield self.call("POST", "/api/repos", {"name": "demo"}, expect=201)
        files = {"schema.hrd": SCHEMA_HRD, "service.hrd": SERVICE_HRD, "actions.py": ACTIONS}
        yield self.call("PUT", "/api/repos/demo/templates/node", {"files": files}, expect=201)
        yield self.call("POST", "/api/repos/demo/blueprints",
                        {"name": "main.yaml", "content": "node__web1:\n  port: 2222\n"}, expect=201)
        _, executed = yield self.call("POST", "/api/repos/demo/blueprints/main.yaml/execute", expect=202)
        return executed

    @inlineCallbacks
    def run_done(self, run_id):
        """The run as GET /api/runs/{id} gives it, once it is recorded."""
        yield self.robot.when_recorded(run_id)
        _, run = yield self.call("GET", f"/api/runs/{run_id}", expect=200)
        self.assertIn(run["state"], DONE_STATES)
        return run

    @inlineCallbacks
    def test_repo_template_blueprint_execute_gives_a_service_with_install_ok(self):
        executed = yield self.setup_demo()
        [run] = executed["runs"]
        self.assertEqual((run["service"], run["action"], run["trigger"]["kind"]),
                         ("node!web1", "install", "blueprint"))
        done = yield self.run_done(run["id"])
        self.assertEqual(done["state"], "ok")
        self.assertIn("installed with port 2222", done["log"])
        _, service = yield self.call("GET", "/api/repos/demo/services/node/web1", expect=200)
        self.assertEqual((service["key"], service["states"]["install"], service["args"]),
                         ("node!web1", "ok", {"port": 2222}))
        self.assertEqual(service["events"], {"email": ["notify", "escalate"]})
        _, template = yield self.call("GET", "/api/repos/demo/templates/node", expect=200)
        self.assertEqual(template["files"]["service.hrd"], SERVICE_HRD)
        self.assertEqual(template["schema"]["port"]["default"], 22)
        _, repos = yield self.call("GET", "/api/repos", expect=200)
        self.assertEqual([r["name"] for r in repos["repos"]], ["demo"])
        yield self.robot.when_executed("demo", "main")  # its status is written after the last run
        _, blueprint = yield self.call("GET", "/api/repos/demo/blueprints/main", expect=200)
        self.assertEqual(blueprint["state"], "ok")

    @inlineCallbacks
    def test_template_put_again_is_200(self):
        yield self.setup_demo()
        code, _ = yield self.call("PUT", "/api/repos/demo/templates/node", {"files": {"actions.py": ACTIONS}})
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_action_run_over_rest_is_202_with_its_id_and_gets_the_args(self):
        yield self.setup_demo()
        code, reply = yield self.call("POST", "/api/repos/demo/services/node/web1/actions/notify",
                                      {"args": {"level": 3}})
        self.assertEqual(code, 202)
        done = yield self.run_done(reply["run"])
        self.assertEqual((done["state"], done["result"], done["trigger"]["kind"]), ("ok", {"level": 3}, "rest"))
        code, reply = yield self.call("POST", "/api/repos/demo/services/node/web1/actions/notify")  # no body
        self.assertEqual(code, 202)
        yield self.run_done(reply["run"])
        _, listed = yield self.call("GET", "/api/runs?service=node!web1&action=notify&state=ok")
        self.assertEqual(len(listed["runs"]), 2)
        _, page = yield self.call("GET", "/api/runs?limit=1")
        self.assertEqual(len(page["runs"]), 1)
        _, rest = yield self.call("GET", f"/api/runs?limit=10&before={page['next']}")
        self.assertNotIn(page["runs"][0]["id"], [r["id"] for r in rest["runs"]])

    @inlineCallbacks
    def test_errors_are_json_sentences_with_the_right_status(self):
        yield self.setup_demo()
        cases = [
            ("POST", "/api/repos", {"name": "demo"}, 409, "already exists"),
            ("POST", "/api/repos", {"name": "../etc"}, 400, "not a repository name"),
            ("GET", "/api/repos/nope", None, 404, "no repository 'nope'"),
            ("PUT", "/api/repos/demo/templates/bad", {"files": {"service.hrd": "recurring.x = 1s\n"}}, 400,
             "below the minimum period of 5s"),
            ("PUT", "/api/repos/demo/templates/bad", {"files": {"actions.py": "def (:"}}, 400, "actions.py line 1"),
            ("POST", "/api/repos/demo/blueprints", {"name": "x", "content": "a: [\n"}, 400, "not valid YAML"),
            ("POST", "/api/repos/demo/blueprints", {"name": "main", "content": "a__b:\n"}, 409, "already exists"),
            ("GET", "/api/repos/demo/blueprints/none", None, 404, "no blueprint 'none.yaml'"),
            ("POST", "/api/repos/demo/services/node/web1/actions/nope", None, 404, "has no action 'nope'"),
            ("POST", "/api/repos/demo/services/node/gone/actions/notify", None, 404, "no service 'node!gone'"),
            ("GET", "/api/runs/nope", None, 404, "no run 'nope'"),
            ("GET", "/api/runs?state=weird", None, 400, "state"),
        ]
        for method, path, body, status, message in cases:
            code, reply = yield self.call(method, path, body)
            self.assertEqual((code, message in reply["error"]), (status, True), (path, reply))

    @inlineCallbacks
    def test_run_result_that_is_not_json_reads_back_as_json_with_null(self):
        yield self.setup_demo()
        _, reply = yield self.call("POST", "/api/repos/demo/services/node/web1/actions/measure", expect=202)
        done = yield self.run_done(reply["run"])  # strict_json: NaN or Infinity in the reply would fail here
        self.assertEqual((done["state"], done["result"]), ("ok", {"nan": None, "inf": None, "fine": 1.5}))
        _, listed = yield self.call("GET", "/api/runs?action=measure", expect=200)
        self.assertEqual(listed["runs"][0]["result"], {"nan": None, "inf": None, "fine": 1.5})

    @inlineCallbacks
    def test_input_the_robot_cannot_take_is_400_with_a_sentence(self):
        yield self.setup_demo()
        deep = "[" * 5000 + "]" * 5000
        cases = [
            ("POST", "/api/repos", {"name": "demo\n"}, "'demo\\n' is not a repository name: 1 to 64 letters, "
             "digits, spaces, '_', '.' or '-', starting with a letter or digit"),
            ("POST", "/api/repos/demo/blueprints", {"name": "deep", "content": f"node__x: {{a: {deep}}}\n"},
             "the blueprint nests lists and mappings too deeply"),
            ("PUT", "/api/repos/demo/templates/deep", {"files": {"actions.py": "x = " + "+".join(["1"] * 300000)}},
             "actions.py nests its code too deeply for Python to parse"),
            ("PUT", "/api/repos/demo/templates/nul", {"files": {"actions.py": "def install(s, e):\x00\n"}},
             "actions.py: source code string cannot contain null bytes"),
        ]
        for method, path, body, message in cases:
            code, reply = yield self.call(method, path, body)
            self.assertEqual((code, reply), (400, {"error": message}), path)
        code, reply = yield self.call("GET", "/api/repos")
        self.assertEqual([r["name"] for r in reply["repos"]], ["demo"])

    @inlineCallbacks
    def test_body_that_is_not_json_is_400_saying_so_without_a_field_path(self):
        yield self.setup_demo()
        response = yield treq.post(self.base + "/api/repos", b'{"name": ', pool=self.pool,
                                   headers={"Content-Type": ["application/json"]})
        reply = yield response.json()
        self.assertEqual(response.code, 400)
        self.assertTrue(reply["error"].startswith("invalid body: Invalid JSON: "), reply)

    def test_documented_names_are_the_names_the_robot_takes(self):
        from cockpit import repos
        from cockpit.ays_api import BLUEPRINT_NAME, REPO_NAME, SERVICE

        samples = ["demo", "env du-conv2", "a", "a.", "a ", ".a", "-a", "a-", "a_b", "main.yaml", "main.yml",
                   "main", "x" * 64, "x" * 65, "x" * 100 + ".yaml", "x" * 101 + ".yaml", "a/b", "é", "a\n", ""]
        checks = [(REPO_NAME, repos.check_repo_name), (BLUEPRINT_NAME, repos.blueprint_name),
                  (SERVICE["role"].schema, lambda name: repos.check_name(name, "role"))]
        for schema, check in checks:
            pattern = re.compile(schema["pattern"])
            for name in samples:
                try:
                    check(name)
                    taken = True
                except repos.Invalid:
                    taken = False
                # Python's "$" also matches before a final newline; JSON Schema's (ECMA-262) does not
                self.assertEqual(taken, bool(pattern.search(name)) and not name.endswith("\n"), (schema, name))

    @inlineCallbacks
    def test_failing_blueprint_is_kept_with_its_error(self):
        yield self.call("POST", "/api/repos", {"name": "demo"}, expect=201)
        yield self.call("POST", "/api/repos/demo/blueprints", {"name": "bad", "content": "nope__x:\n"}, expect=201)
        code, reply = yield self.call("POST", "/api/repos/demo/blueprints/bad.yaml/execute")
        self.assertEqual(code, 400)
        self.assertIn("no template 'nope'", reply["error"])
        _, blueprint = yield self.call("GET", "/api/repos/demo/blueprints/bad.yaml", expect=200)
        self.assertEqual(blueprint["state"], "error")
        self.assertIn("no template 'nope'", blueprint["error"])

    @inlineCallbacks
    def test_updates_and_deletes(self):
        executed = yield self.setup_demo()
        yield self.run_done(executed["runs"][0]["id"])
        yield self.call("PUT", "/api/repos/demo/blueprints/main.yaml", {"content": "node__web2: {}\n"}, expect=200)
        _, blueprint = yield self.call("GET", "/api/repos/demo/blueprints/main.yaml")
        self.assertEqual((blueprint["content"], blueprint["state"]), ("node__web2: {}\n", "new"))
        yield self.call("DELETE", "/api/repos/demo/services/node/web1", expect=204)
        yield self.call("GET", "/api/repos/demo/services/node/web1", expect=404)
        yield self.call("DELETE", "/api/repos/demo/blueprints/main.yaml", expect=204)
        _, listed = yield self.call("GET", "/api/repos/demo/blueprints", expect=200)
        self.assertEqual(listed["blueprints"], [])
        yield self.call("DELETE", "/api/repos/demo", expect=204)
        yield self.call("GET", "/api/repos/demo", expect=404)

    @inlineCallbacks
    def test_routes_are_in_the_openapi_document(self):
        from openapi_spec_validator import validate

        _, document = yield self.call("GET", "/api/openapi.json", expect=200)
        validate(document)
        for path in ("/api/repos", "/api/repos/{repo}/blueprints/{name}/execute",
                     "/api/repos/{repo}/services/{role}/{name}/actions/{action}", "/api/runs/{id}"):
            self.assertIn(path, document["paths"])
