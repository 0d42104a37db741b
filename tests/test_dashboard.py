"""The dashboard at /: its files under a strict CSP, and the ticket cookie that opens the live stream."""
from __future__ import annotations

import json
import re
from typing import Any, Optional

import treq
from openapi_spec_validator import OpenAPIV31SpecValidator
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.dashboard import ASSETS, PAGE_CSP, TICKET_LIFETIME, LiveTickets, asset
from cockpit.web import Api
from tests.cockpits import eventually, spawn_cockpit
from tests.redis_server import shared_server

TOKEN = "s3cret"
WRONG_TOKEN_TEXT = "That token is not one of the cockpit's [api] tokens"
STRICT = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def header(response: Any, name: str) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class Listening:
    """An Api on a Clock, listening on a real port of 127.0.0.1."""

    def __init__(self, test: TestCase, tokens: list[str]):
        self.clock = Clock()
        self.bus = MemoryBus(clock=self.clock)
        self.api = Api(config.from_dict({"api": {"tokens": tokens}}), self.bus, clock=self.clock)
        self.port = reactor.listenTCP(0, self.api.site(reactor), interface="127.0.0.1")
        test.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def get(self, path: str, **kw: Any) -> Deferred:
        return treq.get(self.base + path, persistent=False, **kw)

    def post(self, path: str, **kw: Any) -> Deferred:
        return treq.post(self.base + path, persistent=False, **kw)


class RawStream(protocol.Protocol):
    """Sends one GET and keeps what comes back; ``first`` fires once ``until`` has come, or at the end."""

    def __init__(self, request: bytes, until: bytes):
        self.request = request
        self.until = until
        self.data = b""
        self.first: Deferred = Deferred()
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.until in self.data and not self.first.called:
            self.first.callback(self.data)

    def connectionLost(self, reason: Any) -> None:
        if not self.first.called:
            self.first.callback(self.data)
        self.closed.callback(None)


@inlineCallbacks
def open_live(port: int, cookie: Optional[str], until: bytes = b": live events"):
    """The start of ``GET /api/events/live`` with ``cookie`` (a ``name=value``); fires (status, bytes, stream)."""
    lines = [b"GET /api/events/live HTTP/1.1", b"Host: 127.0.0.1", b"Accept: text/event-stream"]
    if cookie:
        lines.append(b"Cookie: " + cookie.encode())
    stream = RawStream(b"\r\n".join(lines) + b"\r\n\r\n", until)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stream)
    data = yield stream.first
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data, stream


def ticket_cookie(response: Any) -> str:
    """``name=value`` of the Set-Cookie of a session answer."""
    [set_cookie] = response.headers.getRawHeaders("set-cookie")
    return set_cookie.split(";", 1)[0]


class PageTests(TestCase):
    def setUp(self):
        self.server = Listening(self, [TOKEN])

    @inlineCallbacks
    def test_page_and_its_files_are_served_with_the_strict_headers_and_no_token(self):
        for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                           ("/static/app.css", "text/css")):
            response = yield self.server.get(path)
            body = yield response.content()
            self.assertEqual(200, response.code, path)
            self.assertTrue(header(response, "Content-Type").startswith(kind), path)
            for name, value in STRICT.items():
                self.assertEqual(value, header(response, name), (path, name))
            self.assertGreater(len(body), 500, path)

    def test_the_policy_allows_no_inline_script_nor_style_and_no_framing(self):
        self.assertNotIn("unsafe", PAGE_CSP)
        directives = dict(part.strip().split(" ", 1) for part in PAGE_CSP.split(";"))
        self.assertEqual("'self'", directives["script-src"])
        self.assertEqual("'self'", directives["style-src"])
        self.assertEqual("'none'", directives["frame-ancestors"])
        self.assertEqual("'self'", directives["connect-src"])

    def test_the_page_has_no_inline_script_style_or_handler_for_the_policy_to_block(self):
        page = asset("index.html").decode()
        self.assertEqual([], re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page))
        self.assertNotIn("<style", page)
        self.assertEqual([], re.findall(r"\sstyle\s*=", page))
        self.assertEqual([], re.findall(r"\son[a-z]+\s*=", page))
        self.assertIn('<script type="module" src="/static/app.js">', page)
        self.assertIn('href="/static/app.css"', page)
        # nor does the script make them: it sets no inline style and writes no HTML
        script = asset("app.js").decode()
        self.assertEqual([], re.findall(r"\.style\b|innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(",
                                        script))

    def test_no_file_names_an_outside_address(self):
        for name in ASSETS:
            text = asset(name).decode()
            self.assertEqual([], re.findall(r"https?://|wss?://|(?:src|href|url)\s*[=(]\s*[\"']?//", text), name)
            self.assertEqual([], re.findall(r"@import", text), name)

    def test_the_dom_contract_is_in_the_page(self):
        page = asset("index.html").decode()
        for needed in ('id="connection"', 'form id="login"', 'input id="token"', 'button id="login-submit"',
                       'id="login-error"', 'main id="dashboard"', 'id="events"', 'select id="event-type"',
                       'button id="pause"', 'pre id="event-json"', 'id="services"', 'id="runs"',
                       'pre id="run-log"', 'id="runs-repo"', 'id="runs-service"', 'select id="runs-state"',
                       'id="ecos"', 'id="alarms"', 'select id="ecos-sort"', 'select id="alarms-sort"',
                       'select id="silence-duration"', 'id="silences"', 'id="heartbeats"', 'id="health"',
                       'a id="api-docs" href="/api/docs"'):
            self.assertIn(needed, page)
        types = re.search(r'<select id="event-type">(.*?)</select>', page, re.S).group(1)
        self.assertEqual(["", "email", "telegram", "alarm", "eco", "generic"], re.findall(r'value="([^"]*)"', types))
        for sort in ("ecos-sort", "alarms-sort"):
            options = re.search(rf'<select id="{sort}">(.*?)</select>', page, re.S).group(1)
            self.assertEqual(["last_time", "count"], re.findall(r'value="([^"]*)"', options))
        script = asset("app.js").decode()
        for attribute in ("data-guid", "data-type", "data-service", "data-action", "data-state-of", "data-run",
                          '"data-field": "state"', "data-group", "data-do", "data-part"):
            self.assertIn(attribute, script)

    @inlineCallbacks
    def test_unknown_files_are_404_and_nothing_is_listed(self):
        for path in ("/static/", "/static", "/static/nope.js", "/static/index.html", "/static/__init__.py",
                     "/static/..%2F__init__.py", "/static/app.js/", "/dashboard/app.js"):
            response = yield self.server.get(path)
            body = yield response.content()
            self.assertEqual(404, response.code, path)
            self.assertIn("error", json.loads(body), path)


class SessionTests(TestCase):
    def setUp(self):
        self.server = Listening(self, [TOKEN])

    @inlineCallbacks
    def test_the_session_sets_the_ticket_cookie_only_with_a_valid_token(self):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            response = yield self.server.post("/api/events/live/session", headers=headers)
            body = json.loads((yield response.content()))
            self.assertEqual(401, response.code, headers)
            self.assertIsNone(response.headers.getRawHeaders("set-cookie"), headers)
            self.assertIn("error", body)
        response = yield self.server.post("/api/events/live/session", headers={"Authorization": "Bearer nope"})
        self.assertEqual(WRONG_TOKEN_TEXT, json.loads((yield response.content()))["error"])

        response = yield self.server.post("/api/events/live/session", headers={"Authorization": f"Bearer {TOKEN}"})
        body = json.loads((yield response.content()))
        self.assertEqual(200, response.code)
        self.assertEqual({"expires_in": TICKET_LIFETIME}, body)
        [set_cookie] = response.headers.getRawHeaders("set-cookie")
        attributes = {part.strip().split("=", 1)[0].lower(): part.strip().partition("=")[2]
                      for part in set_cookie.split(";")[1:]}
        self.assertEqual("/api/events/live", attributes["path"])
        self.assertIn("httponly", attributes)
        self.assertEqual("strict", attributes["samesite"].lower())
        self.assertEqual(str(int(TICKET_LIFETIME)), attributes["max-age"])
        self.assertNotIn(TOKEN, set_cookie)
        self.assertGreaterEqual(len(ticket_cookie(response).split("=", 1)[1]), 40)

    @inlineCallbacks
    def session(self) -> Any:
        response = yield self.server.post("/api/events/live/session", headers={"Authorization": f"Bearer {TOKEN}"})
        yield response.content()
        return ticket_cookie(response)

    @inlineCallbacks
    def test_a_valid_ticket_opens_the_stream_and_it_carries_events(self):
        cookie = yield self.session()
        status, data, stream = yield open_live(self.server.port.getHost().port, cookie)
        self.assertEqual(200, status, data)
        self.assertIn(b"text/event-stream", data)
        stream.until = b"disk full"
        stream.first = Deferred()
        from cockpit import events

        yield self.server.bus.publish(events.from_data({"type": "alarm", "service": "node!n1", "msg": "disk full"}))
        data = yield stream.first
        self.assertIn(b"event: alarm\n", data)
        stream.transport.loseConnection()
        yield stream.closed

    @inlineCallbacks
    def test_the_stream_refuses_no_wrong_and_expired_tickets_with_401(self):
        cookie = yield self.session()
        name = cookie.split("=", 1)[0]
        port = self.server.port.getHost().port
        for given in (None, f"{name}=not-a-ticket", f"{name}=", "other=" + cookie.split("=", 1)[1]):
            status, data = yield self.refused(port, given)
            self.assertEqual(401, status, (given, data))
        self.server.clock.advance(TICKET_LIFETIME + 1)
        status, data = yield self.refused(port, cookie)
        self.assertEqual(401, status, data)
        self.assertIn(b"Bearer", data)

    @inlineCallbacks
    def refused(self, port: int, cookie: Optional[str]) -> Any:
        status, data, stream = yield open_live(port, cookie, until=b'"error"')
        stream.transport.loseConnection()
        yield stream.closed
        return status, data

    @inlineCallbacks
    def test_a_ticket_opens_only_the_live_stream(self):
        cookie = yield self.session()
        for path in ("/api/events", "/api/ecos", "/api/alarms"):
            response = yield self.server.get(path, headers={"Cookie": cookie})
            yield response.content()
            self.assertEqual(401, response.code, path)

    @inlineCallbacks
    def test_the_bearer_token_still_opens_the_stream(self):
        response = yield self.server.get("/api/events/live", headers={"Authorization": f"Bearer {TOKEN}"},
                                         unbuffered=True)
        self.assertEqual(200, response.code)
        self.assertTrue(header(response, "Content-Type").startswith("text/event-stream"))
        response.original._transport.loseConnection()

    def test_the_session_route_is_documented_with_its_models(self):
        doc = self.server.api.openapi()
        OpenAPIV31SpecValidator(doc).validate()
        op = doc["paths"]["/api/events/live/session"]["post"]
        self.assertEqual([{"bearer": []}], op["security"])
        self.assertIn("401", op["responses"])
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        self.assertEqual({"$ref": "#/components/schemas/LiveSession"}, schema)
        self.assertIn("expires_in", doc["components"]["schemas"]["LiveSession"]["properties"])
        self.assertIn("get", doc["paths"]["/"])
        self.assertNotIn("/static/{name}", doc["paths"])


class TicketTests(TestCase):
    def test_a_ticket_is_valid_for_its_lifetime_only(self):
        clock = Clock()
        tickets = LiveTickets(clock, lifetime=60)
        ticket = tickets.issue()
        self.assertTrue(tickets.valid(ticket))
        clock.advance(59.9)
        self.assertTrue(tickets.valid(ticket))
        clock.advance(0.1)
        self.assertFalse(tickets.valid(ticket))
        self.assertFalse(tickets.valid(b"x" * 10_000))
        self.assertFalse(tickets.valid(None))

    def test_a_ticket_is_taken_by_every_cockpit_with_the_same_tokens_and_by_no_other(self):
        clock = Clock()
        ticket = LiveTickets(clock, [b"t1", b"t2"]).issue()
        self.assertTrue(LiveTickets(clock, [b"t2", b"t1"]).valid(ticket))  # another process, same tokens
        self.assertFalse(LiveTickets(clock, [b"t1"]).valid(ticket))  # the tokens changed
        expiry, nonce, signature = ticket.split(b".")
        self.assertFalse(LiveTickets(clock, [b"t1", b"t2"]).valid(b"%d.%s.%s" % (int(expiry) + 10**6, nonce, signature)))

    def test_two_tickets_differ(self):
        tickets = LiveTickets(Clock())
        self.assertNotEqual(tickets.issue(), tickets.issue())


class RealCockpitTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_a_real_cockpit_serves_the_page_and_streams_to_a_ticket(self):
        redis = shared_server()
        redis.flush()
        cockpit = yield spawn_cockpit(self, extra=f'[redis]\nurl = "{redis.url}"\n',
                                      api=f'tokens = ["{TOKEN}"]').started()
        base = cockpit.api.removesuffix("/api")
        response = yield treq.get(base + "/", persistent=False)
        page = yield response.text()
        self.assertEqual(200, response.code)
        self.assertEqual(PAGE_CSP, header(response, "Content-Security-Policy"))
        self.assertIn("/static/app.js", page)
        response = yield treq.post(cockpit.api + "/events/live/session", persistent=False,
                                   headers={"Authorization": f"Bearer {TOKEN}"})
        yield response.content()
        cookie = ticket_cookie(response)
        port = int(base.rsplit(":", 1)[1])
        status, data, stream = yield open_live(port, cookie)
        self.assertEqual(200, status, data)
        stream.until = b"from the dashboard test"
        stream.first = Deferred()

        @inlineCallbacks
        def published():
            response = yield treq.post(cockpit.api + "/events/alarm", persistent=False,
                                       json={"service": "node!n1", "msg": "from the dashboard test"},
                                       headers={"Authorization": f"Bearer {TOKEN}"})
            yield response.content()
            return response.code == 202

        yield eventually(published, timeout=10, what="the alarm accepted")
        data = yield defer.maybeDeferred(lambda: stream.first)
        self.assertIn(b"event: alarm\n", data)
        stream.transport.loseConnection()
        yield stream.closed
