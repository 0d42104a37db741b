"""Sentry ingest (docs/design.md §10): envelopes and /store/ bodies over real HTTP into a real Redis, and the real SDK."""
from __future__ import annotations

import base64
import gzip
import json
import os
import sys
import tempfile
import textwrap
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import brotli
import treq
from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator
from twisted.internet import reactor, utils
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from cockpit import config, events
from cockpit.backends.redis import RedisBus
from cockpit.config import RedisSection
from cockpit.events import EcoEvent
from cockpit.openapi import downgrade_to_30
from cockpit.sentry import SentryApi, TooLarge, inflate, parse_envelope
from cockpit.store import Store
from cockpit.web import Api
from tests.cockpits import call, eventually, spawn_cockpit
from tests.redis_server import RedisServer, shared_server

KEY = "0123456789abcdef0123456789abcdef"
EVENT_ID = "9ec79c33ec9942ab8353589fcb2e04dc"
AUTH = f"Sentry sentry_key={KEY}, sentry_version=7, sentry_client=sentry.python/2.0.0"

FRAMES = [
    {"filename": "app.py", "abs_path": "/srv/shop/app.py", "function": "main", "module": "app", "lineno": 10,
     "in_app": True, "context_line": "    charge(order)"},
    {"filename": "billing.py", "abs_path": "/srv/shop/billing.py", "function": "charge", "module": "billing",
     "lineno": 42, "in_app": True, "context_line": "    raise ValueError(f'card declined for order {n}')"},
    {"filename": "decimal.py", "abs_path": "/usr/lib/python3.11/decimal.py", "function": "quantize",
     "lineno": 7, "in_app": False},
]


def sentry_event(**fields: Any) -> dict[str, Any]:
    """An error event as sentry-python sends it: a chained exception, the one raised last."""
    event = {
        "event_id": EVENT_ID, "timestamp": "2024-05-01T12:00:00.250000Z", "level": "error",
        "platform": "python", "environment": "prod", "release": "shop@1.4.2", "server_name": "web1",
        "tags": {"region": "eu", "tier": "1"},
        "exception": {"values": [
            {"type": "KeyError", "value": "'sku'", "stacktrace": {"frames": [FRAMES[0]]}},
            {"type": "ValueError", "value": "card declined for order 42", "stacktrace": {"frames": FRAMES}},
        ]},
    }
    event.update(fields)
    return event


def envelope(header: dict[str, Any], *items: tuple[dict[str, Any], bytes]) -> bytes:
    """An envelope as the SDK writes it: the header line, then each item's header line, payload and newline."""
    out = json.dumps(header).encode() + b"\n"
    for item_header, payload in items:
        out += json.dumps(item_header).encode() + b"\n" + payload + b"\n"
    return out


def event_item(event: dict[str, Any], indent: Optional[int] = 2) -> tuple[dict[str, Any], bytes]:
    payload = json.dumps(event, indent=indent).encode()  # newlines inside: only the length frames it
    return {"type": "event", "length": len(payload)}, payload


class SentryServer:
    """An Api with the Sentry routes on a loopback port, its store in a temporary directory, on ``bus``."""

    def __init__(self, test: TestCase, bus: Any, keys: tuple[str, ...] = (KEY,), **api: Any):
        self.data = Path(tempfile.mkdtemp(prefix="cockpit-sentry-"))
        self.config = config.from_dict({"cockpit": {"data_dir": str(self.data)}, "api": api,
                                        "sentry": {"keys": list(keys), "projects": {"7": "billing"}}})
        self.store = Store(self.data / "store", "http://cockpit.example", reactor)
        self.sentry = SentryApi(self.config, bus, self.store, reactor)
        self.api = Api(self.config, bus, store=self.store, services={"sentry": self.sentry.health}, clock=reactor)
        self.api.include(self.sentry)
        port = reactor.listenTCP(0, self.api.site(reactor=reactor), interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def post(self, body: bytes, path: str = "/sentry/api/7/envelope/", auth: Optional[str] = AUTH,
             content_type: Optional[str] = "application/x-sentry-envelope", encoding: Optional[str] = None):
        headers = {}
        if auth is not None:
            headers["X-Sentry-Auth"] = [auth]
        if content_type is not None:
            headers["Content-Type"] = [content_type]
        if encoding is not None:
            headers["Content-Encoding"] = [encoding]
        response = yield treq.post(self.base + path, body, headers=headers, persistent=False)
        text = yield response.text()
        return response.code, json.loads(text), response.headers


class IngestTests(TestCase):
    timeout = 30

    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()
        self.bus = RedisBus(RedisSection(url=self.redis.url), reactor=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.server = SentryServer(self, self.bus)
        return self.bus.when_connected()

    @inlineCallbacks
    def ecos(self) -> Any:
        """Every eco on the bus's durable log, oldest first."""
        entries = yield self.bus.recent("eco", 1000)
        return [event for _, event in reversed(entries)]

    @inlineCallbacks
    def post_ok(self, body: bytes, **options: Any):
        code, reply, _ = yield self.server.post(body, **options)
        self.assertEqual(200, code, reply)
        return reply

    @inlineCallbacks
    def assert_refused(self, status: int, body: bytes, *phrases: str, **options: Any):
        """Posts ``body``, which must be refused with ``status`` saying each of ``phrases``, publishing nothing."""
        before = yield self.ecos()
        code, reply, _ = yield self.server.post(body, **options)
        self.assertEqual(status, code, reply)
        self.assertEqual(["error"], list(reply))
        for phrase in phrases:
            self.assertIn(phrase, reply["error"])
        self.assertEqual(before, (yield self.ecos()))
        return reply["error"]

    # -- framing ------------------------------------------------------------------------
    @inlineCallbacks
    def test_an_item_framed_by_its_length_may_hold_newlines(self):
        body = envelope({"event_id": EVENT_ID, "sent_at": "2024-05-01T12:00:01Z"}, event_item(sentry_event()))
        self.assertGreater(body.count(b"\n"), 10)
        reply = yield self.post_ok(body)
        self.assertEqual({"id": EVENT_ID}, reply)
        [eco] = yield self.ecos()
        self.assertEqual((EVENT_ID, "sentry", "ValueError: card declined for order 42"),
                         (eco.guid, eco.source, eco.error_msg))

    @inlineCallbacks
    def test_an_item_without_a_length_runs_to_the_next_newline(self):
        one_line = json.dumps(sentry_event()).encode()
        body = (b'{"event_id": "%s"}\n{"type": "event"}\n%s\n{"type": "check_in"}\n{"check_in_id": "c1", '
                b'"monitor_slug": "nightly", "status": "ok"}' % (EVENT_ID.encode(), one_line))  # no final newline
        reply = yield self.post_ok(body)
        self.assertEqual({"id": EVENT_ID}, reply)
        [eco] = yield self.ecos()
        self.assertEqual("charge", eco.func_name)
        self.assertEqual(1, self.server.sentry.health()["check_ins"])

    def test_the_framing_reads_what_the_sdk_writes(self):
        require_sdk(self)
        from sentry_sdk.envelope import Envelope, Item, PayloadRef

        sdk = Envelope(headers={"event_id": EVENT_ID})
        sdk.add_event(sentry_event())
        sdk.add_item(Item(payload=PayloadRef(bytes=b"line 1\nline 2\n\n"), type="attachment",
                          filename="log.txt", content_type="text/plain"))
        sdk.add_item(Item(payload=PayloadRef(json={"status": "ok"}), type="check_in"))
        parsed = parse_envelope(sdk.serialize())
        self.assertEqual(EVENT_ID, parsed.header["event_id"])
        self.assertEqual(["event", "attachment", "check_in"], [item.type for item in parsed.items])
        self.assertEqual(b"line 1\nline 2\n\n", parsed.items[1].payload)
        self.assertEqual(sentry_event(), json.loads(parsed.items[0].payload))

    @inlineCallbacks
    def test_bad_framing_is_400_saying_where(self):
        event = json.dumps(sentry_event()).encode()
        cases = [
            (b"not json\n", "the envelope header (its first line)"),
            (b"[1, 2]\n", "the envelope header (its first line): expected a JSON object, got a list"),
            (b'{}\n{"type": "event", "length": 5000}\n' + event + b"\n",
             f"envelope item 1 (event): its header gives a length of 5000 bytes, but only {len(event) + 1} follow"),
            (b'{}\n{"type": "event", "length": 3}\n' + event + b"\n",
             "envelope item 1 (event): expected a newline after its 3-byte payload"),
            (b'{}\n{"type": "check_in"}\n{}\n{"length": 2}\nab\n',
             'envelope item 2: its header has no "type"'),
            (b'{}\n{"type": "event", "length": -1}\n{}\n', 'envelope item 1 (event): "length" must be a whole number'),
            (b'{}\n{"type": "event"\n{}\n', "envelope item 1: its header line: invalid JSON"),
            (b'{}\n{"type": "event"}\n[]\n', "envelope item 1 (event): expected a JSON object, got a list"),
            (b'{}\n\n{"type": "event"}\n{}\n', "envelope item 1: expected its header line"),
        ]
        for body, phrase in cases:
            message = yield self.assert_refused(400, body, phrase)
            self.assertNotIn("Traceback", message)

    # -- encodings ------------------------------------------------------------------------
    @inlineCallbacks
    def test_gzip_deflate_and_brotli_bodies_are_inflated(self):
        def raw_deflate(data: bytes) -> bytes:
            packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            return packer.compress(data) + packer.flush()

        encoders = [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
                    ("deflate", raw_deflate), ("br", brotli.compress), ("identity", lambda data: data),
                    ("gzip, br", lambda data: brotli.compress(gzip.compress(data)))]
        sent = []
        for n, (coding, encode) in enumerate(encoders):
            event_id = f"{n:032x}"
            # big enough to be inflated in a thread, off the reactor
            body = envelope({}, event_item(sentry_event(event_id=event_id, extra={"pad": "x" * 70000})))
            reply = yield self.post_ok(encode(body), encoding=coding)
            self.assertEqual({"id": event_id}, reply, coding)
            sent.append(event_id)
        self.assertEqual(sent, [eco.guid for eco in (yield self.ecos())])
        self.assertEqual({"gzip": 2, "deflate": 2, "br": 1, "identity": 1, "gzip, br": 1},
                         self.server.sentry.health()["encodings"])

    @inlineCallbacks
    def test_a_compression_bomb_is_refused_413(self):
        for coding, bomb in (("gzip", gzip_bomb()), ("br", brotli_bomb()), ("deflate", zlib.compress(b"\0" * (4 << 20)))):
            self.assertLess(len(bomb), 1 << 20, coding)  # it gets past the limit on what comes in
            yield self.assert_refused(413, bomb, "inflates to more than 1048576 bytes ([api] max_body)",
                                      encoding=coding)
        self.assertEqual(3, self.server.sentry.health()["refused"])

    def test_inflating_stops_at_the_limit_not_at_the_end(self):
        limit = 1 << 20
        for coding, bomb in (("gzip", gzip_bomb()), ("br", brotli_bomb()),
                             ("deflate", zlib.compress(b"\0" * (100 << 20), 9))):
            tracemalloc.start()
            try:
                self.assertRaises(TooLarge, inflate, bomb, [coding], limit)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # all of it would be 100 MiB; what is held is the limit and a decoder's buffer
            self.assertLess(peak, 4 * limit, coding)
        self.assertEqual(b"\0" * limit, inflate(gzip.compress(b"\0" * limit), ["gzip"], limit))

    @inlineCallbacks
    def test_an_unknown_encoding_or_broken_data_is_refused(self):
        body = envelope({}, event_item(sentry_event()))
        yield self.assert_refused(415, body, "Content-Encoding 'zstd' is not supported", encoding="zstd")
        yield self.assert_refused(400, gzip.compress(body)[:-12], "gzip data is cut short", encoding="gzip")
        yield self.assert_refused(400, b"not brotli at all", "not valid br data", encoding="br")

    # -- keys -------------------------------------------------------------------------------
    @inlineCallbacks
    def test_a_missing_or_wrong_key_is_401_and_nothing_is_published(self):
        body = envelope({}, event_item(sentry_event()))
        yield self.assert_refused(401, body, "no DSN key", auth=None)
        yield self.assert_refused(401, body, "not one of [sentry] keys", auth="Sentry sentry_key=nope, sentry_version=7")
        yield self.assert_refused(401, body, "not one of [sentry] keys", auth=None,
                                  path="/sentry/api/7/envelope/?sentry_key=nope&sentry_version=7")
        yield self.assert_refused(401, b"{}", "no DSN key", auth=None, path="/sentry/api/7/store/",
                                  content_type="application/json")
        self.assertEqual(4, self.server.sentry.health()["refused"])

    @inlineCallbacks
    def test_the_key_may_come_in_the_query_and_the_content_type_may_be_left_out(self):
        # as a browser or Node SDK sends a binary envelope
        body = envelope({}, event_item(sentry_event()))
        reply = yield self.post_ok(body, auth=None, content_type=None,
                                   path=f"/sentry/api/7/envelope/?sentry_key={KEY}&sentry_version=7")
        self.assertEqual({"id": EVENT_ID}, reply)

    @inlineCallbacks
    def test_with_no_keys_every_request_is_401_saying_so(self):
        server = SentryServer(self, self.bus, keys=())
        code, reply, _ = yield server.post(envelope({}, event_item(sentry_event())))
        self.assertEqual(401, code)
        self.assertIn("[sentry] keys is empty", reply["error"])
        self.assertEqual([], (yield self.ecos()))

    @inlineCallbacks
    def test_a_project_that_is_not_an_id_is_404(self):
        yield self.assert_refused(404, envelope({}, event_item(sentry_event())), "a project id is digits",
                                  path="/sentry/api/billing/envelope/")

    # -- the mapping ------------------------------------------------------------------------
    @inlineCallbacks
    def test_an_event_maps_to_an_eco_as_section_10_says(self):
        yield self.post_ok(envelope({"event_id": EVENT_ID}, event_item(sentry_event())))
        [eco] = yield self.ecos()
        self.assertIsInstance(eco, EcoEvent)
        self.assertEqual({"guid": EVENT_ID, "source": "sentry", "app_name": "billing", "eco_type": "ValueError",
                          "error_msg": "ValueError: card declined for order 42", "func_name": "charge",
                          "func_filename": "billing.py", "line_nbr": 42,
                          "code": "raise ValueError(f'card declined for order {n}')",
                          "tags": ["region:eu", "tier:1"], "epoch": 1714564800},
                         {name: getattr(eco, name) for name in ("guid", "source", "app_name", "eco_type",
                                                                 "error_msg", "func_name", "func_filename",
                                                                 "line_nbr", "code", "tags", "epoch")})
        self.assertEqual({"level": "error", "platform": "python", "environment": "prod", "release": "shop@1.4.2"},
                         json.loads(eco.extra))
        self.assertEqual(textwrap.dedent("""\
            Traceback (most recent call last):
              File "/srv/shop/app.py", line 10, in main
                charge(order)
            KeyError: 'sku'

            Traceback (most recent call last):
              File "/srv/shop/app.py", line 10, in main
                charge(order)
              File "/srv/shop/billing.py", line 42, in charge
                raise ValueError(f'card declined for order {n}')
              File "/usr/lib/python3.11/decimal.py", line 7, in quantize
            ValueError: card declined for order 42"""), eco.backtrace)
        # grouped by the default, never by the event_id that is its guid
        self.assertEqual(eco.default_fingerprint(), eco.fingerprint)
        self.assertNotEqual(EVENT_ID, eco.fingerprint)

    @inlineCallbacks
    def test_other_shapes_sentry_sends_map_too(self):
        frames = [dict(frame, in_app=False) for frame in FRAMES]
        yield self.post_ok(envelope({}, event_item(sentry_event(
            event_id="9EC79C33-EC99-42AB-8353-589FCB2E04DD", timestamp=1714564800.75,
            tags=[["region", "eu"], ["build", 7]],
            exception=[{"type": "OSError", "value": "", "stacktrace": {"frames": frames}}]))))
        yield self.post_ok(envelope({"event_id": "a" * 32}, event_item({
            "logentry": {"message": "disk %s full", "formatted": "disk /var full"}, "level": "warning",
            "threads": {"values": [{"id": 1, "stacktrace": {"frames": FRAMES[:1]}},
                                   {"id": 2, "current": True, "stacktrace": {"frames": FRAMES[:2]}}]}})),
            path="/sentry/api/8/envelope/")
        first, second = yield self.ecos()
        # an uppercase uuid with dashes, a float timestamp, tags as pairs, no in-app frame: the last frame
        self.assertEqual(("9ec79c33ec9942ab8353589fcb2e04dd", 1714564800, ["region:eu", "build:7"], "OSError",
                          "quantize", 7), (first.guid, first.epoch, first.tags, first.error_msg, first.func_name,
                                           first.line_nbr))
        # a message: its text, the envelope's event_id, the project id as app_name, the thread's stack
        self.assertEqual(("a" * 32, "disk /var full", "", "8", "charge"),
                         (second.guid, second.error_msg, second.eco_type, second.app_name, second.func_name))
        self.assertTrue(second.backtrace.startswith("Stack (most recent call last):"), second.backtrace)

    @inlineCallbacks
    def test_an_invalid_event_is_400_naming_the_field(self):
        cases = [
            (sentry_event(event_id="nope"), "envelope item 1 (event): event_id: expected 32 hex digits"),
            (sentry_event(exception={"values": "x"}), "envelope item 1 (event): exception.values: expected a list"),
            (sentry_event(timestamp="yesterday"), "timestamp: expected RFC 3339 text or seconds"),
            (sentry_event(timestamp=1e15), "envelope item 1 (event): epoch:"),
            (sentry_event(tags=[["a"]]), "tags[0]: expected a [key, value] pair"),
            (sentry_event(fingerprint="x"), "fingerprint: expected a list of text"),
        ]
        for event, phrase in cases:
            yield self.assert_refused(400, envelope({}, event_item(event)), phrase)

    @inlineCallbacks
    def test_default_in_a_fingerprint_means_the_default_grouping(self):
        fingerprints = [None, ["{{ default }}"], ["{{default}}", "tenant-a"], ["checkout-failure"]]
        for n, fingerprint in enumerate(fingerprints):
            fields = {"event_id": f"{n + 1:032x}"}
            if fingerprint is not None:
                fields["fingerprint"] = fingerprint
            yield self.post_ok(envelope({}, event_item(sentry_event(**fields))))
        plain, default, tenant, custom = yield self.ecos()
        self.assertEqual(plain.default_fingerprint(), plain.fingerprint)
        self.assertEqual(plain.fingerprint, default.fingerprint)
        self.assertEqual(events.fingerprint_of(plain.fingerprint, "tenant-a"), tenant.fingerprint)
        self.assertEqual(events.fingerprint_of("checkout-failure"), custom.fingerprint)
        self.assertEqual(4, len({plain.guid, default.guid, tenant.guid, custom.guid}))

    # -- attachments, check-ins, the rest ------------------------------------------------
    @inlineCallbacks
    def test_attachments_are_stored_and_linked_from_the_eco(self):
        dump = b"\x00\x01binary\nwith\nnewlines\n"
        log = b"started\nfailed\n"
        body = envelope({"event_id": EVENT_ID}, event_item(sentry_event()),
                        ({"type": "attachment", "length": len(dump), "filename": "core.dmp",
                          "content_type": "application/octet-stream", "attachment_type": "event.minidump"}, dump),
                        ({"type": "attachment", "length": len(log), "filename": "../logs/app.log",
                          "content_type": "text/plain"}, log),
                        ({"type": "attachment", "length": 4, "filename": "app.log"}, b"more"))
        yield self.post_ok(body)
        [eco] = yield self.ecos()
        extra = json.loads(eco.extra)
        self.assertEqual("prod", extra["environment"])
        links = extra["attachments"]
        self.assertEqual({"core.dmp", "app.log", "app.log (2)"}, set(links))
        for name, content in (("core.dmp", dump), ("app.log", log), ("app.log (2)", b"more")):
            url = links[name]
            self.assertTrue(url.startswith("http://cockpit.example/store/attachments/"), url)
            response = yield treq.get(self.server.base + urlsplit(url).path, persistent=False)
            self.assertEqual(200, response.code)
            self.assertEqual(content, (yield response.content()))
            self.assertIn(name.split(" ")[0].encode(), response.headers.getRawHeaders(b"Content-Disposition")[0])
        self.assertEqual(3, self.server.sentry.health()["attachments"])

    @inlineCallbacks
    def test_an_attachment_alone_is_stored_and_counted(self):
        data = b"a crash report\n"
        reply = yield self.post_ok(envelope({}, ({"type": "attachment", "length": len(data), "filename": "r.txt"},
                                                 data)))
        self.assertEqual({"id": None}, reply)
        self.assertEqual([], (yield self.ecos()))
        self.assertEqual(1, self.server.sentry.health()["attachments"])
        stored = list((self.server.data / "store" / "attachments").rglob("*"))
        self.assertIn(data, [path.read_bytes() for path in stored if path.is_file()])

    @inlineCallbacks
    def test_check_ins_are_counted_and_other_items_ignored(self):
        items = [({"type": "check_in"}, b'{"check_in_id": "c1", "monitor_slug": "nightly", "status": "ok"}'),
                 ({"type": "transaction"}, b'{"type": "transaction", "spans": []}'),
                 ({"type": "session"}, b'{"sid": "s1", "status": "ok"}'),
                 ({"type": "session"}, b'{"sid": "s2", "status": "ok"}'),
                 ({"type": "client_report"}, b'{"discarded_events": []}')]
        reply = yield self.post_ok(envelope({"event_id": "b" * 32}, *items))
        self.assertEqual({"id": "b" * 32}, reply)
        self.assertEqual([], (yield self.ecos()))
        health = self.server.sentry.health()
        self.assertEqual((0, 1, 4, {"transaction": 1, "session": 2, "client_report": 1}),
                         (health["events"], health["check_ins"], health["ignored"], health["ignored_types"]))
        response = yield treq.get(self.server.base + "/api/health", persistent=False)
        self.assertEqual(1, (yield response.json())["services"]["sentry"]["check_ins"])

    # -- /store/ -------------------------------------------------------------------------------
    @inlineCallbacks
    def test_the_store_endpoint_takes_one_event(self):
        reply = yield self.post_ok(json.dumps(sentry_event()).encode(), path="/sentry/api/7/store/",
                                   content_type="application/json")
        self.assertEqual({"id": EVENT_ID}, reply)
        # raven's form: zlib inside base64, labelled octet-stream
        legacy = base64.b64encode(zlib.compress(json.dumps(sentry_event(event_id="c" * 32)).encode()))
        reply = yield self.post_ok(legacy, path="/sentry/api/7/store/", content_type="application/octet-stream")
        self.assertEqual({"id": "c" * 32}, reply)
        reply = yield self.post_ok(json.dumps(sentry_event(event_id="e" * 32)).encode(), path="/sentry/api/7/store/",
                                   content_type=None)
        self.assertEqual({"id": "e" * 32}, reply)
        reply = yield self.post_ok(gzip.compress(json.dumps(sentry_event(event_id="d" * 32)).encode()),
                                   path="/sentry/api/7/store/", content_type="application/json", encoding="gzip")
        self.assertEqual({"id": "d" * 32}, reply)
        self.assertEqual([EVENT_ID, "c" * 32, "e" * 32, "d" * 32], [eco.guid for eco in (yield self.ecos())])
        yield self.assert_refused(400, b"[1]", "the event: expected a JSON object", path="/sentry/api/8/store/",
                                  content_type="application/json")

    # -- the document --------------------------------------------------------------------------
    def test_the_routes_are_documented_in_a_valid_document(self):
        doc = self.server.api.openapi()
        OpenAPIV31SpecValidator(doc).validate()
        OpenAPIV30SpecValidator(downgrade_to_30(doc)).validate()
        for path in ("/sentry/api/{project}/envelope/", "/sentry/api/{project}/store/"):
            op = doc["paths"][path]["post"]
            self.assertEqual([], op["security"])
            self.assertEqual(["sentry"], op["tags"])
            self.assertTrue(op["summary"] and op["description"] and op["requestBody"])
            for status in ("200", "400", "401", "404", "413", "415", "503"):
                self.assertIn(status, op["responses"], (path, status))
        self.assertIn("application/x-sentry-envelope",
                      doc["paths"]["/sentry/api/{project}/envelope/"]["post"]["requestBody"]["content"])


class BusDownTests(TestCase):
    timeout = 30

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.bus = RedisBus(RedisSection(url=self.redis.url, timeout=2.0), reactor=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.server = SentryServer(self, self.bus)
        return self.bus.when_connected()

    @inlineCallbacks
    def test_an_event_the_bus_cannot_take_is_503_and_taken_once_it_is_back(self):
        self.redis.stop()
        yield self.bus.when_disconnected()
        body = envelope({}, event_item(sentry_event()))
        code, reply, headers = yield self.server.post(body)
        # the SDK drops the event on a 503 as on a 429 (and a 429 would silence it for a while too)
        self.assertEqual(503, code, reply)
        self.assertIn("the bus cannot take it now", reply["error"])
        self.assertEqual([b"5"], headers.getRawHeaders(b"Retry-After"))
        health = self.server.sentry.health()
        self.assertEqual((0, 1), (health["events"], health["refused"]))
        self.redis.start()
        yield self.bus.when_connected()
        code, reply, _ = yield self.server.post(body)
        self.assertEqual((200, {"id": EVENT_ID}), (code, reply))
        self.assertIn(EVENT_ID, self.redis.command("XRANGE", "ckpt.eco", "-", "+"))


_bombs: dict[str, bytes] = {}


def gzip_bomb() -> bytes:
    """100 MiB of zeros in about 100 kB of gzip."""
    if "gzip" not in _bombs:
        _bombs["gzip"] = gzip.compress(b"\0" * (100 << 20), 9)
    return _bombs["gzip"]


def brotli_bomb() -> bytes:
    if "br" not in _bombs:
        _bombs["br"] = brotli.compress(b"\0" * (100 << 20), quality=1)
    return _bombs["br"]


# ---------------------------------------------------------------------------
# The real SDK against a real cockpit
# ---------------------------------------------------------------------------

APP = '''
import sys

import sentry_sdk

dsn, count, algo = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = {"transport_compression_algo": algo} if algo != "default" else {}
# no client reports: each run sends its events and nothing else
sentry_sdk.init(dsn=dsn, default_integrations=False, send_client_reports=False, _experiments=options)


def charge(order):
    raise ValueError(f"card declined for order {order}")


for order in range(count):
    try:
        charge(order)
    except ValueError:
        sentry_sdk.capture_exception()
sentry_sdk.flush(timeout=20)
'''


def require_sdk(test: TestCase, brotli_too: bool = False) -> None:
    """Fail, saying how to install them, when the real SDK (or brotli) is missing."""
    try:
        import sentry_sdk
    except ImportError:
        test.fail("sentry-sdk is not installed: pip install '.[test]'")
    if brotli_too:
        try:
            import brotli
        except ImportError:
            test.fail("brotli is not installed: pip install '.[test]'")
        test.assertTrue(brotli.compress)
    test.assertTrue(sentry_sdk.VERSION)


class SdkTests(TestCase):
    """sentry-sdk, unmodified, in a process of its own, against ``twistd cockpit`` on a real Redis."""

    timeout = 90

    @inlineCallbacks
    def setUp(self):
        require_sdk(self, brotli_too=True)
        redis = shared_server()
        redis.flush()
        self.cockpit = spawn_cockpit(self, extra=f'[redis]\nurl = "{redis.url}"\n[sentry]\nkeys = ["{KEY}"]\n'
                                                 f'projects = {{"7" = "billing"}}\n')
        yield self.cockpit.started()
        self.host = self.cockpit.api.removeprefix("http://").removesuffix("/api")
        self.app = os.path.join(self.cockpit.data, "shop.py")
        with open(self.app, "w") as handle:
            handle.write(APP)

    @inlineCallbacks
    def run_app(self, key: str = KEY, count: int = 2, algo: str = "default"):
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [self.app, f"http://{key}@{self.host}/sentry/7", str(count), algo],
            env={**os.environ, "SENTRY_DSN": ""}, path=self.cockpit.data, reactor=reactor)
        self.assertEqual(0, code, (out + err).decode(errors="replace"))
        return (out + err).decode(errors="replace")

    @inlineCallbacks
    def sentry_health(self):
        code, health = yield call("GET", f"{self.cockpit.api}/health")
        return health["services"]["sentry"]

    @inlineCallbacks
    def one_group(self, occurences: int):
        @inlineCallbacks
        def counted():
            code, page = yield call("GET", f"{self.cockpit.api}/ecos")
            return page["ecos"] if page["ecos"] and page["ecos"][0]["occurence"] >= occurences else None

        ecos = yield eventually(counted, timeout=30, what=f"an eco group with {occurences} occurrences")
        self.assertEqual(1, len(ecos), ecos)
        return ecos[0]

    @inlineCallbacks
    def test_the_same_exception_twice_is_one_eco_group_of_two(self):
        yield self.run_app()
        group = yield self.one_group(2)
        self.assertEqual(("billing", "ValueError: card declined for order 1", "charge", "ValueError", 2, "NEW"),
                         (group["app_name"], group["error_msg"], group["func_name"], group["eco_type"],
                          group["occurence"], group["state"]))
        self.assertTrue(group["func_filename"].endswith("shop.py"), group["func_filename"])
        self.assertIn('raise ValueError(f"card declined for order {order}")', group["backtrace"])
        health = yield self.sentry_health()
        # with brotli importable, the SDK compresses with it
        self.assertEqual((2, {"br": 2}), (health["events"], health["encodings"]))

    @inlineCallbacks
    def test_the_sdk_with_gzip_forced(self):
        yield self.run_app(count=1, algo="gzip")
        group = yield self.one_group(1)
        self.assertEqual(("billing", "charge"), (group["app_name"], group["func_name"]))
        self.assertEqual({"gzip": 1}, (yield self.sentry_health())["encodings"])

    @inlineCallbacks
    def test_a_dsn_with_a_wrong_key_stores_nothing(self):
        yield self.run_app(key="f" * 32, count=1)
        # the SDK has flushed: its envelope was answered before it exited
        self.assertEqual(1, (yield self.sentry_health())["refused"])
        code, page = yield call("GET", f"{self.cockpit.api}/events?type=eco")
        self.assertEqual((200, []), (code, page["events"]))


class SchemathesisTests(TestCase):
    """schemathesis (its CLI, in a process of its own) on the Sentry routes, with a DSN key, on a real Redis."""

    timeout = 120
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
              "response_schema_conformance,response_headers_conformance")

    def setUp(self):
        redis = shared_server()
        redis.flush()
        self.bus = RedisBus(RedisSection(url=redis.url), reactor=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.server = SentryServer(self, self.bus)
        return self.bus.when_connected()

    @inlineCallbacks
    def test_schemathesis_finds_no_server_error_and_no_schema_violation(self):
        st = str(Path(sys.executable).parent / "st")
        out, err, code = yield utils.getProcessOutputAndValue(
            st, ["run", f"{self.server.base}/api/openapi.json", "--header", f"X-Sentry-Auth: {AUTH}",
                 "--include-path-regex", "^/sentry/", "--checks", self.checks, "--max-examples", "30",
                 "--request-timeout", "5", "--seed", os.environ.get("SCHEMATHESIS_SEED", "1"),
                 "--phases", "examples,coverage,fuzzing", "--no-color"],
            env={"PATH": "/usr/bin:/bin", "HOME": tempfile.mkdtemp(), "SCHEMATHESIS_HOOKS": ""}, reactor=reactor)
        report = (out + err).decode(errors="replace")
        self.assertEqual(0, code, report[-6000:])
        self.assertIn("passed", report)
        # the pass got past the key: bodies were read, and some refused as what they are
        health = self.server.sentry.health()
        self.assertGreater(health["refused"], 0, report[-3000:])
