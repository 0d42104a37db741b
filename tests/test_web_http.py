"""The REST API over a real listening port: Server-Sent Events and the body limit."""
from __future__ import annotations

import json
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.bus import MemoryBus
from cockpit.web import Api, BoundedRequest


class RawClient(protocol.Protocol):
    """Sends bytes as given and collects what comes back: for what an HTTP library hides."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()
        self._waiting: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for marker, d in list(self._waiting):
            if marker in self.received:
                self._waiting.remove((marker, d))
                d.callback(self.received)

    def connectionLost(self, reason) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"connection closed; received {self.received!r}"))
        self._waiting = []
        self.closed.callback(self.received)

    def wait_for(self, marker: bytes, timeout: float = 5.0) -> Deferred:
        if marker in self.received:
            return defer.succeed(self.received)
        d = Deferred()
        self._waiting.append((marker, d))
        return d.addTimeout(timeout, reactor)


class LiveServer:
    """An Api listening on a free loopback port of the real reactor."""

    def __init__(self, test: TestCase, **api_settings):
        self.clock = Clock()  # the keep-alive timer: driven by the test
        self.site_clock = Clock()  # the site's timers (linger after a 413, idle timeouts)
        self.bus = MemoryBus(clock=reactor)
        self.api = Api(config.from_dict({"api": api_settings}), self.bus, clock=self.clock)
        self.port = reactor.listenTCP(0, self.api.site(reactor=self.site_clock), interface="127.0.0.1")
        self.test = test
        test.addCleanup(self.port.stopListening)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @inlineCallbacks
    def connect(self, request: bytes):
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client)
        self.test.addCleanup(lambda: client.closed)  # runs second: the connection is gone
        self.test.addCleanup(client.transport.loseConnection)
        client.transport.write(request)
        return client


class LiveEventsTests(TestCase):
    def setUp(self):
        self.server = LiveServer(self)

    def subscribe(self, query: str = "") -> Deferred:
        return self.server.connect(
            f"GET /api/events/live{query} HTTP/1.1\r\nHost: cockpit\r\nAccept: text/event-stream\r\n\r\n".encode())

    @inlineCallbacks
    def post(self, event_type: str, body: dict) -> Deferred:
        response = yield treq.post(f"{self.server.base}/api/events/{event_type}", json.dumps(body).encode(),
                                   headers={"Content-Type": ["application/json"]}, persistent=False)
        payload = yield response.json()
        self.assertEqual(202, response.code)
        return payload["guid"]

    @inlineCallbacks
    def test_posted_event_reaches_an_sse_client(self):
        client = yield self.subscribe()
        yield client.wait_for(b": live events")
        self.assertIn(b"Content-Type: text/event-stream", client.received)
        guid = yield self.post("alarm", {"service": "node!n1", "msg": "disk full"})
        yield client.wait_for(guid.encode())
        frame = client.received.split(b"event: alarm\n", 1)[1].split(b"\n\n", 1)[0]
        lines = dict(line.split(b": ", 1) for line in frame.split(b"\n"))
        self.assertEqual(guid.encode(), lines[b"id"])
        self.assertEqual("disk full", json.loads(lines[b"data"])["msg"])

    @inlineCallbacks
    def test_type_filter_only_passes_that_type(self):
        client = yield self.subscribe("?type=eco")
        yield client.wait_for(b": live events")
        alarm = yield self.post("alarm", {"service": "node!n1"})
        eco = yield self.post("eco", {"error_msg": "boom"})
        yield client.wait_for(eco.encode())
        self.assertNotIn(alarm.encode(), client.received)

    @inlineCallbacks
    def test_keep_alive_comment_every_interval(self):
        client = yield self.subscribe()
        yield client.wait_for(b": live events")
        self.assertNotIn(b"keep-alive", client.received)
        self.server.clock.advance(Api.keepalive_interval)
        yield client.wait_for(b": keep-alive\n\n")

    @inlineCallbacks
    def test_disconnect_cancels_the_subscription(self):
        client = yield self.subscribe()
        yield client.wait_for(b": live events")
        self.assertEqual(1, len(self.server.bus._subscriptions))
        [subscription] = self.server.bus._subscriptions
        client.transport.loseConnection()
        yield subscription.when_cancelled()
        self.assertEqual(set(), self.server.bus._subscriptions)
        self.assertEqual([], self.server.clock.getDelayedCalls())  # the keep-alive stopped too

    @inlineCallbacks
    def test_bad_type_filter_is_400_before_streaming(self):
        response = yield treq.get(f"{self.server.base}/api/events/live?type=fax", persistent=False)
        payload = yield response.json()
        self.assertEqual(400, response.code)
        self.assertIn("query parameter type", payload["error"])
        self.assertEqual(set(), self.server.bus._subscriptions)


class BodyLimitTests(TestCase):
    def setUp(self):
        self.server = LiveServer(self, max_body=1000)

    def request(self, headers: str, body: bytes = b"") -> Deferred:
        return self.server.connect(
            f"POST /api/events/generic HTTP/1.1\r\nHost: cockpit\r\nContent-Type: application/json\r\n"
            f"{headers}\r\n".encode() + body)

    @staticmethod
    def status(raw: bytes) -> int:
        return int(raw.split(b"\r\n", 1)[0].split(b" ")[1])

    @inlineCallbacks
    def test_announced_length_over_max_body_is_413_before_the_body(self):
        client = yield self.request("Content-Length: 5000000\r\n")  # and no body follows
        received = yield client.closed
        self.assertEqual(413, self.status(received))
        body = json.loads(received.split(b"\r\n\r\n", 1)[1])
        self.assertIn("larger than 1000 bytes", body["error"])
        self.assertEqual([], (yield self.server.bus.recent()))

    @inlineCallbacks
    def test_expect_continue_gets_413_and_no_100(self):
        client = yield self.request("Content-Length: 5000\r\nExpect: 100-continue\r\n")
        received = yield client.closed
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertNotIn(b"100 Continue", received)

    @inlineCallbacks
    def test_chunked_body_is_cut_off_once_over_max_body(self):
        client = yield self.request("Transfer-Encoding: chunked\r\n")
        chunk = b'{"tags": ["' + b"x" * 600
        client.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        client.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        received = yield client.wait_for(b"}")
        self.assertEqual(413, self.status(received))
        # the server drops the rest and then lets go of the connection
        self.server.site_clock.advance(BoundedRequest.linger)
        yield client.closed
        self.assertEqual([], (yield self.server.bus.recent()))

    @inlineCallbacks
    def test_body_within_max_body_is_published(self):
        body = json.dumps({"tags": ["x" * 900]}).encode()
        response = yield treq.post(f"{self.server.base}/api/events/generic", body,
                                   headers={"Content-Type": ["application/json"]}, persistent=False)
        self.assertEqual(202, response.code)
        yield response.json()



class UrlDecodingTests(TestCase):
    def setUp(self):
        self.server = LiveServer(self)

    @inlineCallbacks
    def answer(self, path: bytes, host: bytes = b"cockpit") -> Deferred:
        client = yield self.server.connect(b"GET " + path + b" HTTP/1.1\r\nHost: " + host +
                                           b"\r\nConnection: close\r\n\r\n")
        received = yield client.closed
        head, _, body = received.partition(b"\r\n\r\n")
        return head, body

    @inlineCallbacks
    def test_path_or_host_that_is_not_utf8_is_a_json_400(self):
        for path, host in ((b"/api/runs/%ff", b"cockpit"), (b"/api/health", b"\xffcockpit")):
            head, body = yield self.answer(path, host)
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
            self.assertIn(b"Content-Type: application/json", head)
            self.assertIn("not UTF-8", json.loads(body)["error"])
        head, _ = yield self.answer(b"/api/health")  # and the site still answers
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
