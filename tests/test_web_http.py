"""The REST API over a real listening port: Server-Sent Events, the body limit, deadlines, big bodies."""
from __future__ import annotations

import json
import re
import threading

import treq
import yaml
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from cockpit import config, events
from cockpit.backends.embedded import MemoryBus
from cockpit.events import GenericEvent
from cockpit.openapi import JSON, Body, Response, RouteTable
from cockpit.web import Api, ApiChannel, BoundedRequest, event_frame, sse_frame
from tests.arrivals import Arrivals


class RawClient(protocol.Protocol):
    """Sends bytes as given and collects what comes back: for what an HTTP library hides."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()
        self._waiting: list[tuple[bytes, int, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for entry in list(self._waiting):
            marker, count, d = entry
            if self.received.count(marker) >= count:
                self._waiting.remove(entry)
                d.callback(self.received)

    def connectionLost(self, reason) -> None:
        for _, _, d in self._waiting:
            d.errback(AssertionError(f"connection closed; received {self.received[-2000:]!r}"))
        self._waiting = []
        self.closed.callback(self.received)

    def wait_for(self, marker: bytes, timeout: float = 5.0, count: int = 1) -> Deferred:
        """Fires once ``marker`` has come ``count`` times in all."""
        if self.received.count(marker) >= count:
            return defer.succeed(self.received)
        d = Deferred()
        self._waiting.append((marker, count, d))
        return d.addTimeout(timeout, reactor)


class ThreadedClock(Clock):
    """A Clock for the site's timers, with the real reactor's threads for what it runs off the reactor."""

    def getThreadPool(self):
        return reactor.getThreadPool()

    def callFromThread(self, f, *args, **kwargs):
        return reactor.callFromThread(f, *args, **kwargs)


class ObservedChannel(ApiChannel):
    """The site's own channel, which tells the test when it has a connection and what it received."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.factory.received.append(data)


class LiveServer:
    """An Api listening on a free loopback port of the real reactor."""

    def __init__(self, test: TestCase, **api_settings):
        self.clock = Clock()  # the keep-alive timer: driven by the test
        self.site_clock = ThreadedClock()  # the site's timers (linger after a 413, deadlines, idle timeouts)
        self.bus = MemoryBus(clock=reactor)
        self.api = Api(config.from_dict({"api": api_settings}), self.bus, clock=self.clock)
        self.site = self.api.site(reactor=self.site_clock)
        self.site.protocol = ObservedChannel
        self.site.connections = self.connections = Arrivals()
        self.site.received = self.received = Arrivals()
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
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


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP response, as far as whole chunks have come."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    out = []
    while True:
        size_line, found, rest = body.partition(b"\r\n")
        if not found:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size + 2:
            break
        out.append(rest[:size])
        body = rest[size + 2:]
    return b"".join(out)


def parse_sse(stream: bytes) -> list[dict]:
    """The events a browser's EventSource dispatches from ``stream`` (WHATWG HTML, server-sent events)."""
    dispatched, data, name, last_id = [], [], "", ""
    for line in re.split(rb"\r\n|\r|\n", stream):
        if not line:
            if data:
                dispatched.append({"event": name or "message", "data": "\n".join(data), "id": last_id})
            data, name = [], ""
            continue
        if line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        text = value.decode()
        if field == b"event":
            name = text
        elif field == b"data":
            data.append(text)
        elif field == b"id" and "\0" not in text:
            last_id = text
    return dispatched


class HostileEvent:
    """Not an event the models would make: what the stream writer must survive whatever it is handed."""

    def __init__(self, type: str = "alarm", guid: str = "g-1\r\nevent: injected\r\ndata: {\"owned\": 1}\n\nid: x",
                 data: bytes = b'{"msg": "a"}\n\nevent: injected\ndata: {"owned": 1}\r\rid: y\r\ndata: z'):
        self.type, self.guid, self._data = type, guid, data

    def to_json(self) -> bytes:
        return self._data


class LiveWriterTests(TestCase):
    def setUp(self):
        self.server = LiveServer(self, live_backlog=256 * 1024)
        self.logged: list[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    @inlineCallbacks
    def subscribe(self) -> Deferred:
        client = yield self.server.connect(b"GET /api/events/live HTTP/1.1\r\nHost: cockpit\r\n\r\n")
        yield client.wait_for(b": live events")
        return client

    def test_data_is_one_data_line_per_line_whatever_the_line_break(self):
        frame = sse_frame("alarm", "g-1", b"one\rtwo\nthree\r\nfour\n")
        self.assertEqual(b"event: alarm\nid: g-1\ndata: one\ndata: two\ndata: three\ndata: four\ndata: \n\n", frame)
        self.assertEqual([{"event": "alarm", "id": "g-1", "data": "one\ntwo\nthree\nfour\n"}], parse_sse(frame))

    def test_an_id_with_a_line_break_or_nul_is_left_out(self):
        for unsafe in ("a\nid: b", "a\rb", "a\0b", "\ud800", "x" * 300):
            frame = sse_frame("alarm", unsafe, b"{}")
            self.assertEqual(b"event: alarm\ndata: {}\n\n", frame, unsafe)

    def test_an_event_name_that_is_not_a_token_is_refused(self):
        for unsafe in ("alarm\ndata: x", "alarm\r", "al arm", "", "a" * 65, "\u00e9v\u00e9nement", "\ud800"):
            self.assertRaises(ValueError, sse_frame, unsafe, "g-1", b"{}")
        self.assertRaises(ValueError, event_frame, HostileEvent(type=None))

    @inlineCallbacks
    def test_a_hostile_event_handed_to_the_writer_reaches_a_client_as_one_event_of_its_own(self):
        client = yield self.subscribe()
        hostile = HostileEvent()
        self.server.api.fanout.publish(hostile)
        self.server.api.fanout.publish(HostileEvent(type="alarm\nevent: injected"))  # refused whole
        marker = GenericEvent(tags=["after"])
        self.server.api.fanout.publish(marker)
        yield client.wait_for(marker.guid.encode())
        dispatched = parse_sse(dechunk(client.received))
        self.assertEqual(["alarm", "generic"], [e["event"] for e in dispatched])
        self.assertEqual("", dispatched[0]["id"])  # the unsafe id was left out
        self.assertEqual(hostile.to_json().decode().replace("\r\n", "\n").replace("\r", "\n"), dispatched[0]["data"])
        self.assertEqual(marker.guid, dispatched[1]["id"])
        refused = [e for e in self.logged if "cannot go to the live streams" in e.get("log_format", "")]
        self.assertEqual(1, len(refused))

    @inlineCallbacks
    def test_each_event_is_framed_once_for_every_client(self):
        clients = []
        for _ in range(3):
            clients.append((yield self.subscribe()))
        calls = []

        class Counted(GenericEvent):
            def to_json(self) -> bytes:
                calls.append(1)
                return super().to_json()

        event = Counted(tags=["x"])
        self.server.api.fanout.publish(event)
        for client in clients:
            yield client.wait_for(event.guid.encode())
        self.assertEqual(1, len(calls))

    @inlineCallbacks
    def test_a_client_that_does_not_read_is_dropped_past_the_backlog_and_a_reader_keeps_up(self):
        reader = yield self.subscribe()
        idle = yield self.subscribe()
        idle.transport.pauseProducing()  # reads no more: the kernel's buffers fill, then the backlog
        fanout = self.server.api.fanout
        sent = []
        while len(fanout.streams) == 2 and len(sent) < 1000:
            event = GenericEvent(tags=["big"], args={"blob": "x" * 65536})
            yield self.server.bus.publish(event)
            sent.append(event.guid)
            yield reader.wait_for(event.guid.encode())
        self.assertEqual(1, len(fanout.streams), "the client that does not read was never dropped")
        idle.transport.resumeProducing()  # it reads what it was sent, then finds the connection gone
        yield idle.closed
        dropped = [e for e in self.logged if "fell" in e.get("log_format", "")]
        self.assertEqual(1, len(dropped))
        self.assertGreater(dropped[0]["held"], 256 * 1024)
        self.assertLess(dropped[0]["held"], 256 * 1024 + 2 * 70000)  # dropped as soon as it passed the bound
        # the reader got every event and is still served
        self.assertEqual(sent, [e["id"] for e in parse_sse(dechunk(reader.received))])
        self.assertFalse(reader.closed.called)
        last = GenericEvent(tags=["after"])
        yield self.server.bus.publish(last)
        yield reader.wait_for(last.guid.encode())


class DeadlineTests(TestCase):
    """Reading a request has deadlines on the site's clock; answering it has none."""

    def setUp(self):
        self.server = LiveServer(self)

    @inlineCallbacks
    def connect(self, data: bytes):
        client = yield self.server.connect(data)
        yield self.server.connections.when(1)
        if data:
            yield self.server.received.when(1)
        return client

    @staticmethod
    def answer(raw: bytes) -> tuple[bytes, dict]:
        head, _, body = raw.partition(b"\r\n\r\n")
        return head, json.loads(body)

    @inlineCallbacks
    def test_headers_that_trickle_in_get_408_at_header_timeout_however_often_bytes_come(self):
        client = yield self.connect(b"GET /api/health HTTP/1.1\r\n")
        for n, byte in enumerate(b"Host: cock"[:9], start=2):
            self.server.site_clock.advance(1)
            client.transport.write(bytes([byte]))
            yield self.server.received.when(n)
        self.assertEqual(b"", client.received)  # 9 s in, and a byte a second: still waiting
        self.server.site_clock.advance(1)
        head, body = self.answer((yield client.closed))
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), head)
        self.assertIn(b"Connection: close", head)
        self.assertEqual("the request's headers did not arrive within 10 s ([api] header_timeout)", body["error"])

    @inlineCallbacks
    def test_a_body_that_trickles_in_gets_408_at_body_timeout_and_nothing_is_published(self):
        client = yield self.connect(b"POST /api/events/generic HTTP/1.1\r\nHost: cockpit\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{")
        self.server.site_clock.advance(59)
        client.transport.write(b'"tags": ')
        yield self.server.received.when(2)
        self.assertEqual(b"", client.received)
        self.server.site_clock.advance(1)
        head, body = self.answer((yield client.closed))
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), head)
        self.assertEqual("the request's body did not arrive within 60 s ([api] body_timeout)", body["error"])
        self.assertEqual([], (yield self.server.bus.recent()))

    @inlineCallbacks
    def test_a_connection_that_sends_nothing_is_closed_at_header_timeout_without_an_answer(self):
        client = yield self.connect(b"")
        self.server.site_clock.advance(9.9)
        self.assertFalse(client.closed.called)
        self.server.site_clock.advance(0.1)
        self.assertEqual(b"", (yield client.closed))

    @inlineCallbacks
    def test_a_kept_alive_connection_is_closed_after_idle_timeout(self):
        client = yield self.connect(b"GET /api/health HTTP/1.1\r\nHost: cockpit\r\n\r\n")
        yield client.wait_for(b'"status"')
        answered = len(client.received)
        self.server.site_clock.advance(59)
        self.assertFalse(client.closed.called)
        # a second request in time is answered on the same connection, and the idle wait starts again
        client.transport.write(b"GET /api/health HTTP/1.1\r\nHost: cockpit\r\n\r\n")
        yield client.wait_for(b'"status"', count=2)
        self.server.site_clock.advance(59)
        self.assertFalse(client.closed.called)
        self.server.site_clock.advance(1)
        received = yield client.closed
        self.assertEqual(2, received.count(b"HTTP/1.1 200 "))
        self.assertNotIn(b"408", received[answered:])

    @inlineCallbacks
    def test_an_event_stream_outlives_every_deadline(self):
        client = yield self.connect(b"GET /api/events/live HTTP/1.1\r\nHost: cockpit\r\n\r\n")
        yield client.wait_for(b": live events")
        self.server.site_clock.advance(3600)
        event = GenericEvent(tags=["late"])
        yield self.server.bus.publish(event)
        yield client.wait_for(event.guid.encode())
        self.assertFalse(client.closed.called)


def recorded_parse(seen: list, release: threading.Event):
    """A body parser that records the thread it runs in and, for a big body, waits to be released."""
    def parse(raw: bytes, kind: str, _: dict) -> dict:
        seen.append(threading.current_thread() is threading.main_thread())
        if len(raw) > Api.thread_parse_over and not release.wait(30):
            raise AssertionError("never released")  # the reactor could not answer while this ran
        return {"size": len(raw)}
    return parse


class BigBodyTests(TestCase):
    def setUp(self):
        self.server = LiveServer(self)
        self.seen: list[bool] = []
        self.release = threading.Event()
        self.addCleanup(self.release.set)
        routes = RouteTable(tag="test")

        class Sized:
            @routes.post("/api/test/sized", summary="Echo the body's size", auth=False,
                         body=Body({"type": "object"}, (JSON,), {}, recorded_parse(self.seen, self.release)),
                         responses={200: Response("The size", {"type": "object"})})
            def sized(self, request, body):
                return body

        self.server.api.include(Sized(), routes)

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> Deferred:
        return treq.post(f"{self.server.base}{path}", body, headers={"Content-Type": [content_type]},
                         persistent=False)

    @inlineCallbacks
    def test_a_big_body_is_parsed_in_a_thread_while_health_answers(self):
        small = yield self.post("/api/test/sized", b"{}")
        self.assertEqual({"size": 2}, (yield small.json()))
        big_body = b'{"x": "' + b"y" * (Api.thread_parse_over + 1) + b'"}'
        big = self.post("/api/test/sized", big_body)
        answered = []
        big.addCallback(lambda response: answered.append(response) or response)
        health = yield treq.get(f"{self.server.base}/api/health", persistent=False)
        self.assertEqual(200, health.code)
        yield health.json()
        self.assertEqual([], answered)  # still parsing, off the reactor
        self.release.set()
        response = yield big
        self.assertEqual({"size": len(big_body)}, (yield response.json()))
        self.assertEqual([True, False], self.seen)  # the small one on the reactor thread, the big one not

    @inlineCallbacks
    def test_a_one_mebibyte_yaml_event_is_parsed_off_the_reactor_and_published(self):
        threads_seen = []
        real = events.from_yaml

        def from_yaml(raw, event_type=None):
            threads_seen.append(threading.current_thread() is threading.main_thread())
            return real(raw, event_type)

        self.patch(events, "from_yaml", from_yaml)
        text = yaml.safe_dump({"tags": ["big"], "args": {"lines": ["l" * 100] * 9000}}).encode()
        self.assertGreater(len(text), 900_000)
        response = yield self.post("/api/events/generic", text, "application/yaml")
        self.assertEqual(202, response.code)
        guid = (yield response.json())["guid"]
        [(_, event)] = yield self.server.bus.recent("generic")
        self.assertEqual((guid, 9000), (event.guid, len(event.args["lines"])))
        self.assertEqual([False], threads_seen)

    @inlineCallbacks
    def test_a_bad_big_body_is_a_400_from_the_thread(self):
        body = b'{"args": {"x": "' + b"y" * 70000 + b'"}, "colour": "red"}'
        response = yield self.post("/api/events/generic", body)
        self.assertEqual(400, response.code)
        self.assertIn("colour: unknown field", (yield response.json())["error"])


class RedirectTests(TestCase):
    def setUp(self):
        self.server = LiveServer(self)

    @inlineCallbacks
    def test_a_path_without_its_slash_redirects_relatively_and_echoes_nothing(self):
        for path, location in ((b"/store", b"/store/"), (b"//api//health", b"/api/health")):
            client = yield self.server.connect(b"GET " + path + b" HTTP/1.1\r\nHost: evil.example\r\n"
                                               b"Connection: close\r\n\r\n")
            received = yield client.closed
            head = received.partition(b"\r\n\r\n")[0]
            self.assertTrue(head.startswith(b"HTTP/1.1 308 "), head)
            self.assertIn(b"\r\nLocation: " + location + b"\r\n", head)
            self.assertEqual({"error": "this resource has moved: see the Location header"},
                             json.loads(dechunk(received)))
            self.assertNotIn(b"evil", received)
