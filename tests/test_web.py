"""The REST API through treq's StubTreq: publishing, listing, errors, auth and the route mechanism."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.examples import SEED_YAML
from cockpit.openapi import ApiError, Param, Reply, Response, RouteTable
from cockpit.web import Api

TOKEN = "s3cret-token"


def make_api(bus=None, **api_settings: Any) -> tuple[Api, MemoryBus, StubTreq]:
    cfg = config.from_dict({"api": api_settings})
    bus = bus or MemoryBus(clock=Clock())
    api = Api(cfg, bus, clock=reactor)
    return api, bus, StubTreq(api.app.resource())


def auth(token: str = TOKEN) -> dict[str, list[str]]:
    return {"Authorization": [f"Bearer {token}"]}


class PublishTests(TestCase):
    def setUp(self):
        self.api, self.bus, self.client = make_api()

    @inlineCallbacks
    def post(self, event_type: str, body: Any, content_type: str = "application/json", **kw: Any):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        if isinstance(data, str):
            data = data.encode()
        response = yield self.client.post(f"http://cockpit/api/events/{event_type}", data=data,
                                          headers={"Content-Type": [content_type]}, **kw)
        payload = yield response.json()
        return response, payload

    @inlineCallbacks
    def test_every_seed_example_is_published_from_yaml_with_202(self):
        for event_type, examples in SEED_YAML.items():
            for name, text in examples.items():
                response, payload = yield self.post(event_type, text, "application/yaml")
                self.assertEqual(202, response.code, (name, payload))
                entries = yield self.bus.recent(event_type, 10)
                self.assertIn(payload["guid"], [event.guid for _, event in entries])

    @inlineCallbacks
    def test_json_alarm_is_published_with_source_rest(self):
        response, payload = yield self.post("alarm", {"service": "node!n1", "msg": "disk full"})
        self.assertEqual(202, response.code)
        [(_, event)] = yield self.bus.recent("alarm")
        self.assertEqual(payload["guid"], event.guid)
        self.assertEqual("rest", event.source)
        self.assertEqual("disk full", event.msg)

    @inlineCallbacks
    def test_given_source_is_kept(self):
        yield self.post("generic", {"source": "jenkins", "tags": ["build"]})
        [(_, event)] = yield self.bus.recent("generic")
        self.assertEqual("jenkins", event.source)

    @inlineCallbacks
    def test_each_yaml_content_type_is_accepted(self):
        for kind in ("application/yaml", "application/x-yaml", "text/yaml", "text/yaml; charset=utf-8"):
            response, _ = yield self.post("generic", "tags: [a]\n", kind)
            self.assertEqual(202, response.code, kind)

    @inlineCallbacks
    def test_invalid_field_is_400_naming_the_field(self):
        response, payload = yield self.post("alarm", {"service": "no-bang"})
        self.assertEqual(400, response.code)
        self.assertIn("service", payload["error"])

    @inlineCallbacks
    def test_unknown_field_is_400_naming_it(self):
        response, payload = yield self.post("email", {"subject": "x", "colour": "red"})
        self.assertEqual(400, response.code)
        self.assertIn("colour: unknown field", payload["error"])

    @inlineCallbacks
    def test_broken_yaml_is_400_saying_where(self):
        response, payload = yield self.post("telegram", "io: input\naction: x\nargs:\nname:'a'\n  b: c\n",
                                            "application/yaml")
        self.assertEqual(400, response.code)
        self.assertIn("invalid YAML at line", payload["error"])

    @inlineCallbacks
    def test_broken_json_is_400(self):
        response, payload = yield self.post("alarm", b"{\"service\": ")
        self.assertEqual(400, response.code)
        self.assertIn("invalid JSON", payload["error"])

    @inlineCallbacks
    def test_event_nested_too_deeply_is_400_and_not_published(self):
        for levels in (100, 5000):  # what the bus could not read back, and what Python's parser gives up on
            body = b'{"args": {"a": ' + b"[" * levels + b"]" * levels + b"}}"
            response, payload = yield self.post("generic", body)
            self.assertEqual(400, response.code)
            self.assertIn("nests lists and objects deeper than", payload["error"])
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_type_in_body_must_match_the_url(self):
        response, payload = yield self.post("alarm", {"type": "eco"})
        self.assertEqual(400, response.code)
        self.assertIn("type:", payload["error"])

    @inlineCallbacks
    def test_a_repeated_eco_guid_is_published_and_answered_as_a_duplicate(self):
        eco = {"guid": "eco-guid-1", "app_name": "shop", "error_msg": "boom"}
        first_response, first = yield self.post("eco", eco)
        _, again = yield self.post("eco", eco)
        _, other = yield self.post("eco", {**eco, "guid": "eco-guid-2"})
        self.assertEqual(202, first_response.code)
        self.assertEqual(({"guid": "eco-guid-1", "duplicate": False}, {"guid": "eco-guid-1", "duplicate": True}),
                         (first, again))
        self.assertFalse(other["duplicate"])
        self.assertEqual(3, len((yield self.bus.recent("eco"))))  # consumers count a guid once
        _, alarm = yield self.post("alarm", {"service": "node!n1", "msg": "x"})
        self.assertNotIn("duplicate", alarm)

    @inlineCallbacks
    def test_a_repeat_after_a_day_is_not_a_duplicate(self):
        eco = {"guid": "eco-guid-3", "app_name": "shop", "error_msg": "boom"}
        yield self.post("eco", eco)
        self.bus.clock.advance(86401)
        _, later = yield self.post("eco", eco)
        self.assertFalse(later["duplicate"])

    @inlineCallbacks
    def test_the_docs_page_answers_with_a_trailing_slash(self):
        response = yield self.client.get("http://cockpit/api/docs/")
        self.assertEqual(200, response.code)
        self.assertIn("<title>Cockpit API</title>", (yield response.text()))

    @inlineCallbacks
    def test_unknown_event_type_is_404(self):
        response, payload = yield self.post("fax", {"x": 1})
        self.assertEqual(404, response.code)
        self.assertIn("unknown event type 'fax'", payload["error"])

    @inlineCallbacks
    def test_other_content_type_is_415(self):
        response, payload = yield self.post("alarm", b"service=a!b", "application/x-www-form-urlencoded")
        self.assertEqual(415, response.code)
        self.assertIn("application/json", payload["error"])

    @inlineCallbacks
    def test_empty_body_is_400(self):
        response, payload = yield self.post("alarm", b"")
        self.assertEqual(400, response.code)
        self.assertEqual("the body is empty", payload["error"])

    @inlineCallbacks
    def test_body_over_max_body_is_413_even_without_the_site(self):
        self.api, self.bus, self.client = make_api(max_body=100)
        response, payload = yield self.post("generic", {"args": {"x": "y" * 200}})
        self.assertEqual(413, response.code)
        self.assertIn("100 bytes", payload["error"])


class RecentTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.api, self.bus, self.client = make_api(MemoryBus(clock=self.clock))
        from cockpit.events import AlarmEvent, GenericEvent

        for n in range(5):
            yield self.bus.publish(AlarmEvent(service=f"node!n{n}", msg=str(n)))
            yield self.bus.publish(GenericEvent(tags=[str(n)]))
            self.clock.advance(0.001)

    @inlineCallbacks
    def get(self, query: str):
        response = yield self.client.get(f"http://cockpit/api/events{query}")
        return response, (yield response.json())

    @inlineCallbacks
    def test_recent_events_are_listed_newest_first(self):
        response, payload = yield self.get("")
        self.assertEqual(200, response.code)
        self.assertEqual(10, len(payload["events"]))
        self.assertEqual(["generic", "alarm"], [e["type"] for e in payload["events"][:2]])
        self.assertEqual(["4", "4"], [payload["events"][0]["tags"][0], payload["events"][1]["msg"]])
        self.assertIsNone(payload["next"])

    @inlineCallbacks
    def test_type_filter_and_paging_with_next(self):
        _, first = yield self.get("?type=alarm&limit=2")
        self.assertEqual(["4", "3"], [e["msg"] for e in first["events"]])
        _, second = yield self.get(f"?type=alarm&limit=2&before={first['next']}")
        self.assertEqual(["2", "1"], [e["msg"] for e in second["events"]])
        _, third = yield self.get(f"?type=alarm&limit=2&before={second['next']}")
        self.assertEqual(["0"], [e["msg"] for e in third["events"]])
        self.assertIsNone(third["next"])

    @inlineCallbacks
    def test_paging_across_types_loses_and_repeats_nothing(self):
        seen, before = [], ""
        while True:
            _, page = yield self.get(f"?limit=3{before}")
            seen += [e["guid"] for e in page["events"]]
            if page["next"] is None:
                break
            before = f"&before={page['next']}"
        self.assertEqual(10, len(seen))
        self.assertEqual(10, len(set(seen)))

    @inlineCallbacks
    def test_limit_over_1000_is_400_naming_it(self):
        response, payload = yield self.get("?limit=1001")
        self.assertEqual(400, response.code)
        self.assertIn("query parameter limit", payload["error"])

    @inlineCallbacks
    def test_unknown_type_filter_is_400(self):
        response, payload = yield self.get("?type=fax")
        self.assertEqual(400, response.code)
        self.assertIn("query parameter type", payload["error"])

    @inlineCallbacks
    def test_before_beyond_a_stream_id_is_400(self):
        response, payload = yield self.get("?before=790-76921455128300803792")
        self.assertEqual(400, response.code)
        self.assertIn("query parameter before", payload["error"])

    @inlineCallbacks
    def test_malformed_before_is_400(self):
        response, payload = yield self.get("?before=yesterday")
        self.assertEqual(400, response.code)
        self.assertIn("before", payload["error"])


class AuthTests(TestCase):
    def setUp(self):
        self.api, self.bus, self.client = make_api(tokens=["other", TOKEN])

    @inlineCallbacks
    def test_no_token_is_401_with_www_authenticate(self):
        response = yield self.client.get("http://cockpit/api/events")
        payload = yield response.json()
        self.assertEqual(401, response.code)
        self.assertIn("Bearer", payload["error"])
        self.assertEqual([b'Bearer realm="cockpit"'], response.headers.getRawHeaders(b"WWW-Authenticate"))

    @inlineCallbacks
    def test_wrong_token_is_401(self):
        response = yield self.client.post("http://cockpit/api/events/alarm", data=b"{}",
                                          headers={**auth("guess"), "Content-Type": ["application/json"]})
        self.assertEqual(401, response.code)
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_any_configured_token_is_accepted(self):
        for token in ("other", TOKEN):
            response = yield self.client.get("http://cockpit/api/events", headers=auth(token))
            self.assertEqual(200, response.code)

    @inlineCallbacks
    def test_health_and_openapi_need_no_token(self):
        for path in ("/api/health", "/api/openapi.json"):
            response = yield self.client.get(f"http://cockpit{path}")
            self.assertEqual(200, response.code, path)

    @inlineCallbacks
    def test_token_is_checked_before_the_body(self):
        response = yield self.client.post("http://cockpit/api/events/alarm", data=b"not json",
                                          headers={"Content-Type": ["text/plain"]})
        self.assertEqual(401, response.code)


class RoutingErrorTests(TestCase):
    def setUp(self):
        self.api, self.bus, self.client = make_api()

    @inlineCallbacks
    def test_unknown_route_is_json_404(self):
        response = yield self.client.get("http://cockpit/api/nothing-here")
        payload = yield response.json()
        self.assertEqual(404, response.code)
        self.assertEqual("no such route: GET /api/nothing-here", payload["error"])

    @inlineCallbacks
    def test_wrong_method_is_json_405_with_allow(self):
        response = yield self.client.delete("http://cockpit/api/events")
        payload = yield response.json()
        self.assertEqual(405, response.code)
        self.assertIn("DELETE is not allowed", payload["error"])
        self.assertIn(b"GET", response.headers.getRawHeaders(b"Allow")[0])

    @inlineCallbacks
    def test_get_on_a_publish_route_is_405(self):
        response = yield self.client.get("http://cockpit/api/events/alarm")
        self.assertEqual(405, response.code)


class Greeting(BaseModel):
    text: str


class Name(BaseModel):
    name: str


class GreeterApi:
    """What another module does to add routes: its own table, mounted with Api.include."""

    routes = RouteTable(tag="greetings")

    def __init__(self, word: str):
        self.word = word

    @routes.get("/api/greetings/{name}", summary="Greet someone", params={"name": Param("Who")},
                responses={200: Response("A greeting", Greeting), 404: Response("Nobody")})
    def greet(self, request, name: str):
        if name == "nobody":
            raise ApiError(404, "nobody is here")
        return Greeting(text=f"{self.word}, {name}")

    @routes.post("/api/greetings", summary="Make a greeting", body=Name,
                 responses={201: Response("Made", Greeting)})
    async def make(self, request, body: Name):
        return Reply(201, {"text": f"{self.word}, {body.name}"}, {"Location": f"/api/greetings/{body.name}"})


class IncludeTests(TestCase):
    def setUp(self):
        self.api, self.bus, self.client = make_api(tokens=[TOKEN])
        self.api.include(GreeterApi("hello"))

    @inlineCallbacks
    def test_included_routes_are_served_with_their_instance(self):
        response = yield self.client.get("http://cockpit/api/greetings/ann", headers=auth())
        self.assertEqual(200, response.code)
        self.assertEqual({"text": "hello, ann"}, (yield response.json()))

    @inlineCallbacks
    def test_included_routes_need_the_token(self):
        response = yield self.client.get("http://cockpit/api/greetings/ann")
        self.assertEqual(401, response.code)

    @inlineCallbacks
    def test_api_error_becomes_json(self):
        response = yield self.client.get("http://cockpit/api/greetings/nobody", headers=auth())
        self.assertEqual(404, response.code)
        self.assertEqual({"error": "nobody is here"}, (yield response.json()))

    @inlineCallbacks
    def test_json_body_is_validated_into_the_model(self):
        response = yield self.client.post("http://cockpit/api/greetings", data=b'{"name": "bo"}',
                                          headers={**auth(), "Content-Type": ["application/json"]})
        self.assertEqual(201, response.code)
        self.assertEqual([b"/api/greetings/bo"], response.headers.getRawHeaders(b"Location"))
        response = yield self.client.post("http://cockpit/api/greetings", data=b'{"nom": "bo"}',
                                          headers={**auth(), "Content-Type": ["application/json"]})
        payload = yield response.json()
        self.assertEqual(400, response.code)
        self.assertIn("name: field required", payload["error"])

    def test_included_routes_are_in_the_document(self):
        doc = self.api.openapi()
        op = doc["paths"]["/api/greetings/{name}"]["get"]
        self.assertEqual(["greetings"], op["tags"])
        self.assertEqual({"200", "400", "401", "404"}, set(op["responses"]))
        self.assertIn("Greeting", doc["components"]["schemas"])
        self.assertIn("requestBody", doc["paths"]["/api/greetings"]["post"])
