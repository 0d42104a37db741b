"""The OpenAPI document, the Swagger UI page, and a bounded schemathesis pass against a live API."""
from __future__ import annotations

import os

import re
import sys
import tempfile
from pathlib import Path

import yaml
from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator
from treq.testing import StubTreq
from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.ays_api import AysApi
from cockpit.backends.embedded import MemoryBus
from cockpit.events import from_yaml
from cockpit.examples import SEED_YAML
from cockpit.openapi import downgrade_to_30
from cockpit.tap import build
from cockpit.web import Api
from tests.redis_server import shared_server

SEEDS = Path(__file__).parent / "seeds"


def make_api(**settings) -> Api:
    """The API with every route the cockpit serves (the AYS routes need no robot to be documented)."""
    api = Api(config.from_dict(settings), MemoryBus(clock=Clock()), clock=Clock())
    api.include(AysApi(None))
    return api


class DocumentTests(TestCase):
    def setUp(self):
        self.api = make_api()
        self.doc = self.api.openapi()

    def test_document_is_valid_openapi_3_1(self):
        self.assertEqual("3.1.0", self.doc["openapi"])
        OpenAPIV31SpecValidator(self.doc).validate()

    def test_rendering_for_swagger_ui_is_valid_openapi_3_0(self):
        OpenAPIV30SpecValidator(downgrade_to_30(self.doc)).validate()

    def test_every_served_route_is_documented_with_its_statuses(self):
        documented = {(method.upper(), path) for path, ops in self.doc["paths"].items() for method in ops}
        served = {(r.method, r.path) for r in self.api.declared if not r.hidden}
        self.assertEqual(served, documented)
        for path, ops in self.doc["paths"].items():
            for method, op in ops.items():
                self.assertTrue(op["responses"], (method, path))
                for status, response in op["responses"].items():
                    if int(status) >= 400 and path != "/api/health":  # health says why in its own shape
                        self.assertEqual({"$ref": "#/components/schemas/ErrorReply"},
                                         response["content"]["application/json"]["schema"], (path, status))

    def test_section_5_routes_of_this_module_are_there(self):
        for method, path in [("get", "/api/health"), ("get", "/api/events"), ("get", "/api/events/live"),
                             ("post", "/api/webhooks/github"), ("post", "/api/mail"), ("get", "/api/ecos"),
                             ("get", "/api/alarms"), ("get", "/api/ecos/{id}"), ("get", "/api/alarms/{id}"),
                             ("post", "/api/ecos/{id}/{action}"), ("post", "/api/alarms/{id}/{action}"),
                             ("get", "/api/openapi.json"), ("get", "/api/docs"),
                             ("get", "/store/{space}/{aa}/{bb}/{hash}"), ("get", "/")]:
            self.assertIn(method, self.doc["paths"].get(path, {}), path)
        for event_type in ("email", "telegram", "alarm", "eco", "generic"):
            op = self.doc["paths"][f"/api/events/{event_type}"]["post"]
            self.assertEqual({"200", "202"} & set(op["responses"]), {"202"})
            for status in ("400", "401", "413", "415"):
                self.assertIn(status, op["responses"])
            content = op["requestBody"]["content"]
            self.assertEqual({"application/json", "application/yaml", "application/x-yaml", "text/yaml"},
                             set(content))

    def test_event_bodies_use_the_event_models(self):
        schemas = self.doc["components"]["schemas"]
        op = self.doc["paths"]["/api/events/email"]["post"]
        self.assertEqual({"$ref": "#/components/schemas/EmailEvent"},
                         op["requestBody"]["content"]["application/json"]["schema"])
        self.assertIn("from", schemas["EmailEvent"]["properties"])

    def test_seed_examples_are_the_body_examples(self):
        for event_type, examples in SEED_YAML.items():
            op = self.doc["paths"][f"/api/events/{event_type}"]["post"]
            documented = op["requestBody"]["content"]["application/json"]["examples"]
            for name, text in examples.items():
                self.assertEqual(yaml.safe_load(text), documented[name]["value"])

    def test_runtime_examples_are_the_restored_seeds(self):
        files = {path.stem: path.read_text() for path in SEEDS.glob("*.yaml")}
        shipped = {name: text for examples in SEED_YAML.values() for name, text in examples.items()}
        self.assertEqual(set(files), set(shipped))
        for name, text in files.items():
            event_type = name.split("_")[0]
            self.assertEqual(from_yaml(text, event_type).model_dump(exclude={"guid", "epoch"}),
                             from_yaml(shipped[name], event_type).model_dump(exclude={"guid", "epoch"}))

    def test_authenticated_routes_say_so(self):
        self.assertEqual([], self.doc["paths"]["/api/health"]["get"]["security"])
        self.assertEqual([], self.doc["paths"]["/api/webhooks/github"]["post"]["security"])
        self.assertEqual([{"bearer": []}], self.doc["paths"]["/api/events"]["get"]["security"])
        self.assertEqual("bearer", self.doc["components"]["securitySchemes"]["bearer"]["scheme"])


class DocsPageTests(TestCase):
    def setUp(self):
        self.client = StubTreq(make_api(api={"tokens": ["t"]}).app.resource())

    @inlineCallbacks
    def test_docs_page_loads_only_local_assets_under_a_self_only_policy(self):
        response = yield self.client.get("http://cockpit/api/docs")
        page = yield response.text()
        self.assertEqual(200, response.code)
        policy = response.headers.getRawHeaders(b"Content-Security-Policy")[0].decode()
        self.assertIn("default-src 'self'", policy)
        self.assertIn("connect-src 'self'", policy)
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        self.assertTrue(assets)
        for asset in assets:
            self.assertTrue(asset.startswith("/api/docs/"), asset)
            found = yield self.client.get(f"http://cockpit{asset}")
            self.assertEqual(200, found.code, asset)
            yield found.content()

    @inlineCallbacks
    def test_initializer_points_at_this_document_with_no_validator(self):
        response = yield self.client.get("http://cockpit/api/docs/swagger-initializer.js")
        script = yield response.text()
        self.assertIn('url: "/api/docs/openapi-3.0.json"', script)
        self.assertIn("validatorUrl: null", script)
        self.assertNotIn("http", script)
        document = yield self.client.get("http://cockpit/api/docs/openapi-3.0.json")
        self.assertEqual("3.0.3", (yield document.json())["openapi"])

    @inlineCallbacks
    def test_other_files_are_404(self):
        for name in ("index.j2", "..%2f__init__.py", "oauth2-redirect.html"):
            response = yield self.client.get(f"http://cockpit/api/docs/{name}")
            self.assertEqual(404, response.code, name)
            yield response.json()


EXAMPLE_ACTIONS = """
def install(service, event):
    service.log("installed on port", service.args["port"])
    return {"port": service.args["port"]}
"""


class SchemathesisTests(TestCase):
    """schemathesis (its CLI, in a process of its own) against the cockpit as ``twistd cockpit`` serves it.

    The service tree is the one :func:`cockpit.tap.build` wires, AYS robot and worker included,
    on a real Redis and a data directory of its own; it listens on loopback ports only.
    """

    timeout = 120

    # No 5xx, and every answer as documented: status, content type, headers and body schema.
    # Not checked: whether a body the schema calls invalid is refused. The event models are
    # lenient on purpose (a lone string for a list, "5" for an integer), and that is their contract.
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
              "response_schema_conformance,response_headers_conformance")

    @inlineCallbacks
    def setUp(self):
        redis = shared_server()
        redis.flush()
        cfg = config.from_dict({
            "cockpit": {"data_dir": self.mktemp()},
            "redis": {"url": redis.url},  # the real thing: Redis answers the queries
            "api": {"tokens": ["tok"], "listen": "tcp:0:interface=127.0.0.1"},
            # the relay port is closed: mails are accepted (202) and wait for it
            "mail": {"listen": "tcp:0:interface=127.0.0.1",
                     "relay": {"host": "127.0.0.1", "port": 9, "retries": 0}},
            "ays": {"workers": 1, "action_timeout": 5.0}})
        self.cockpit = build(cfg, reactor)
        self.cockpit.startService()
        self.addCleanup(self.cockpit.stopService)
        yield self.cockpit.getServiceNamed("bus").when_connected()
        robot = self.cockpit.robot
        yield robot.ready
        # the objects the document's example names point at, so the pass reaches past the 404s
        yield robot.create_repo("demo")
        yield robot.put_template("demo", "mailbox", {"schema.hrd": "port = type:int default:22\n",
                                                     "actions.py": EXAMPLE_ACTIONS})
        yield robot.add_blueprint("demo", "main.yaml", "mailbox__ops: {}\n")
        runs, installed = yield robot.execute_blueprint("demo", "main.yaml")
        yield installed
        self.port = self.cockpit.getServiceNamed("web").port

    def schemathesis(self, *selection: str) -> Deferred:
        """Run the CLI over the operations ``selection`` picks; fires with (exit code, report)."""
        base = f"http://127.0.0.1:{self.port.getHost().port}"
        st = str(Path(sys.executable).parent / "st")
        d = utils.getProcessOutputAndValue(
            st, ["run", f"{base}/api/openapi.json", "--header", "Authorization: Bearer tok",
                 "--checks", self.checks, "--max-examples", "15", "--request-timeout", "5",
                 # the same cases every run, so the suite is not flaky; set SCHEMATHESIS_SEED to explore
                 "--seed", os.environ.get("SCHEMATHESIS_SEED", "1"),
                 "--exclude-path", "/api/events/live",  # an endless stream; tests of its own cover it
                 *selection, "--phases", "examples,coverage,fuzzing", "--no-color"],
            env={"PATH": "/usr/bin:/bin", "HOME": tempfile.mkdtemp(), "SCHEMATHESIS_HOOKS": ""},
            reactor=reactor)
        return d.addCallback(lambda result: (result[2], (result[0] + result[1]).decode(errors="replace")))

    @inlineCallbacks
    def test_schemathesis_finds_no_server_error_and_no_schema_violation(self):
        # what reads and adds first, so the document's example names still find the demo objects;
        # then what replaces and deletes
        code, report = yield self.schemathesis("--exclude-method", "PUT", "--exclude-method", "DELETE")
        self.assertEqual(0, code, report[-6000:])
        self.assertIn("passed", report)
        # the pass got through to the worker: the example names ran the demo service's install
        runs = yield self.cockpit.robot.list_runs(limit=1000, repo="demo", service="mailbox!ops", action="install")
        self.assertIn("rest", [run["trigger"]["kind"] for run in runs])
        code, report = yield self.schemathesis("--include-method", "PUT", "--include-method", "DELETE")
        self.assertEqual(0, code, report[-6000:])
        self.assertIn("passed", report)
