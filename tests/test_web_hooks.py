"""GitHub webhooks and mail out through the REST API."""
from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

import uuid

from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.smtp import MailSender
from cockpit.web import GITHUB_DELIVERY_NAMESPACE, GITHUB_DELIVERY_TTL, Api
from tests.test_web_http import LiveServer, dechunk
from cockpit.backends.embedded.outbox import SpoolOutbox

SECRET = "hook-secret"
PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "acme/shop"}}


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class GithubWebhookTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.bus = MemoryBus(clock=self.clock)
        cfg = config.from_dict({"api": {"tokens": ["t"], "github_secret": SECRET}})
        self.client = StubTreq(Api(cfg, self.bus, clock=reactor).app.resource())

    @inlineCallbacks
    def hook(self, body: bytes, event: str = "push", signature: str = None, delivery: str = "d-1",
             content_type: str = "application/json"):
        headers = {"Content-Type": [content_type], "X-GitHub-Event": [event], "X-GitHub-Delivery": [delivery]}
        if signature is not None:
            headers["X-Hub-Signature-256"] = [signature]
        response = yield self.client.post("http://cockpit/api/webhooks/github", data=body, headers=headers)
        return response, (yield response.json())

    @inlineCallbacks
    def test_signed_push_becomes_a_generic_github_event(self):
        body = json.dumps(PUSH).encode()
        response, payload = yield self.hook(body, signature=sign(body))
        self.assertEqual(202, response.code)
        [(_, event)] = yield self.bus.recent("generic")
        self.assertEqual(payload["guid"], event.guid)
        self.assertEqual(("github", ["github", "push"]), (event.source, event.tags))
        self.assertEqual({"event": "push", "delivery": "d-1", "payload": PUSH}, event.args)

    @inlineCallbacks
    def test_wrong_signature_is_401_and_publishes_nothing(self):
        body = json.dumps(PUSH).encode()
        response, payload = yield self.hook(body, signature=sign(body, "guess"))
        self.assertEqual(401, response.code)
        self.assertIn("does not match", payload["error"])
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_missing_signature_is_401_when_a_secret_is_set(self):
        response, payload = yield self.hook(json.dumps(PUSH).encode())
        self.assertEqual(401, response.code)
        self.assertIn("missing", payload["error"])

    @inlineCallbacks
    def test_payload_nested_too_deeply_is_400_and_not_published(self):
        for levels in (100, 5000):  # what the bus could not read back, and what Python's parser gives up on
            body = b'{"a": ' + b"[" * levels + b"]" * levels + b"}"
            response, payload = yield self.hook(body, signature=sign(body))
            self.assertEqual(400, response.code)
            self.assertIn("nests lists and objects deeper than", payload["error"])
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_ping_is_answered_200_and_not_published(self):
        body = b'{"zen": "Keep it logically awesome."}'
        response, payload = yield self.hook(body, event="ping", signature=sign(body))
        self.assertEqual(200, response.code)
        self.assertEqual("ping", payload["event"])
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_form_encoded_delivery_is_accepted(self):
        body = urlencode({"payload": json.dumps(PUSH)}).encode()
        response, _ = yield self.hook(body, signature=sign(body), content_type="application/x-www-form-urlencoded")
        self.assertEqual(202, response.code)
        [(_, event)] = yield self.bus.recent("generic")
        self.assertEqual(PUSH, event.args["payload"])

    @inlineCallbacks
    def test_missing_github_headers_are_400_naming_them(self):
        body = json.dumps(PUSH).encode()
        response = yield self.client.post("http://cockpit/api/webhooks/github", data=body,
                                          headers={"Content-Type": ["application/json"],
                                                   "X-Hub-Signature-256": [sign(body)]})
        payload = yield response.json()
        self.assertEqual(400, response.code)
        self.assertIn("X-GitHub-Event", payload["error"])

    @inlineCallbacks
    def test_signed_garbage_is_400(self):
        body = b"not json"
        response, payload = yield self.hook(body, signature=sign(body))
        self.assertEqual(400, response.code)
        self.assertIn("not a GitHub payload", payload["error"])

    @inlineCallbacks
    def test_unsigned_webhook_is_accepted_when_no_secret_is_set(self):
        client = StubTreq(Api(config.from_dict({"api": {"tokens": ["t"]}}), self.bus, clock=reactor).app.resource())
        response = yield client.post("http://cockpit/api/webhooks/github", data=json.dumps(PUSH).encode(),
                                     headers={"Content-Type": ["application/json"], "X-GitHub-Event": ["issues"],
                                              "X-GitHub-Delivery": ["d-2"]})
        self.assertEqual(202, response.code)
        yield response.json()


    @inlineCallbacks
    def test_a_payload_value_the_bus_cannot_carry_is_400_naming_the_field(self):
        digits = "1" * 4301
        cases = [
            (b'{"x": "\\ud800"}', "payload.x: the text holds a lone surrogate (\\ud800)"),
            (b'{"a": {"n": ' + digits.encode() + b"}}", "payload.a.n: an integer of 4301 digits; at most 4300"),
            (b'{"list": [1, NaN]}', "payload.list[1]: NaN is not a JSON number"),
            (b'[1, 2]', "the body is not a GitHub payload: expected a JSON object, got list"),
        ]
        for body, message in cases:
            response, payload = yield self.hook(body, signature=sign(body))
            self.assertEqual(400, response.code, body[:40])
            self.assertIn(message, payload["error"])
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_a_form_encoded_payload_is_checked_the_same_way(self):
        form = "application/x-www-form-urlencoded"
        cases = [
            (urlencode({"payload": '{"x": "\\udfff"}'}).encode(), "payload.x: the text holds a lone surrogate"),
            (b"payload=%7B%22x%22%3A%22%FF%22%7D", "a form body is ASCII, with %-escapes of UTF-8 text"),
            (b"payload=%7B%22x%22%3A%22%ED%A0%80%22%7D", "a form body is ASCII, with %-escapes of UTF-8 text"),
            (b"other=1", "the form has no payload field"),
        ]
        for body, message in cases:
            response, payload = yield self.hook(body, signature=sign(body), content_type=form)
            self.assertEqual(400, response.code, body)
            self.assertIn(message, payload["error"])
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_the_signature_is_checked_before_headers_and_content_type(self):
        body = json.dumps(PUSH).encode()
        response = yield self.client.post("http://cockpit/api/webhooks/github", data=body,
                                          headers={"Content-Type": ["text/plain"],
                                                   "X-Hub-Signature-256": [sign(body, "guess")]})
        self.assertEqual(401, response.code)
        self.assertIn("does not match", (yield response.json())["error"])

    @inlineCallbacks
    def test_an_event_name_that_is_not_a_short_token_is_400(self):
        body = json.dumps(PUSH).encode()
        for name in ("Push", "push event", "p" * 65, "push\x01", ""):
            response, payload = yield self.hook(body, event=name, signature=sign(body))
            self.assertEqual(400, response.code, name)
            self.assertIn("header X-GitHub-Event: ", payload["error"])
        response, payload = yield self.hook(body, delivery="d 1", signature=sign(body))
        self.assertEqual(400, response.code)
        self.assertIn("header X-GitHub-Delivery: expected text matching", payload["error"])
        self.assertEqual([], (yield self.bus.recent()))

    @inlineCallbacks
    def test_a_repeated_delivery_is_published_once_and_answered_200_as_a_duplicate(self):
        body = json.dumps(PUSH).encode()
        answers = []
        for _ in range(5):
            response, payload = yield self.hook(body, signature=sign(body), delivery="72d3162e-cc78-11e3-81ab")
            answers.append((response.code, payload))
        guid = str(uuid.uuid5(GITHUB_DELIVERY_NAMESPACE, "72d3162e-cc78-11e3-81ab"))
        self.assertEqual((202, {"guid": guid, "event": "push"}), answers[0])
        self.assertEqual([(200, {"guid": guid, "event": "push", "duplicate": True})] * 4, answers[1:])
        self.assertEqual([guid], [event.guid for _, event in (yield self.bus.recent())])
        # another delivery is another event
        response, _ = yield self.hook(body, signature=sign(body), delivery="d-other")
        self.assertEqual(202, response.code)
        self.assertEqual(2, len((yield self.bus.recent())))

    @inlineCallbacks
    def test_a_delivery_is_published_again_once_its_mark_has_expired(self):
        body = json.dumps(PUSH).encode()
        response, _ = yield self.hook(body, signature=sign(body))
        self.assertEqual(202, response.code)
        self.clock.advance(GITHUB_DELIVERY_TTL - 1)
        response, _ = yield self.hook(body, signature=sign(body))
        self.assertEqual(200, response.code)
        self.clock.advance(1)
        response, _ = yield self.hook(body, signature=sign(body))
        self.assertEqual(202, response.code)


class GithubHeadersOverHttpTests(TestCase):
    """Header bytes as they come off the wire, which an HTTP library would not send."""

    def setUp(self):
        self.server = LiveServer(self, github_secret=SECRET)

    @inlineCallbacks
    def send(self, event: bytes, signature: bytes) -> tuple[int, dict]:
        body = json.dumps(PUSH).encode()
        client = yield self.server.connect(
            b"POST /api/webhooks/github HTTP/1.1\r\nHost: cockpit\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nX-GitHub-Event: " + event + b"\r\nX-GitHub-Delivery: d-1\r\n"
            b"X-Hub-Signature-256: " + signature + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        received = yield client.closed
        head, _, rest = received.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(dechunk(received) if b"chunked" in head else rest)

    @inlineCallbacks
    def test_an_event_header_that_is_not_utf8_is_400_once_the_signature_holds(self):
        body = json.dumps(PUSH).encode()
        status, payload = yield self.send(b"pu\xffsh", sign(body).encode())
        self.assertEqual((400, {"error": "header X-GitHub-Event: not UTF-8 text"}), (status, payload))
        status, payload = yield self.send(b"pu\xffsh", sign(body, "guess").encode())
        self.assertEqual(401, status)
        self.assertEqual([], (yield self.server.bus.recent()))


class MailTests(TestCase):
    def make_client(self, mailer) -> StubTreq:
        return StubTreq(Api(config.from_dict({}), MemoryBus(clock=Clock()), clock=Clock(), mailer=mailer).app.resource())

    @inlineCallbacks
    def send(self, client: StubTreq, mail: dict):
        response = yield client.post("http://cockpit/api/mail", data=json.dumps(mail).encode(),
                                     headers={"Content-Type": ["application/json"]})
        return response, (yield response.json())

    @inlineCallbacks
    def test_no_relay_is_503_saying_so(self):
        response, payload = yield self.send(self.make_client(None), {"to": ["a@b.c"], "subject": "s", "body": "b"})
        self.assertEqual(503, response.code)
        self.assertEqual("no [mail.relay] is configured; the cockpit cannot send mail", payload["error"])

    @inlineCallbacks
    def test_no_relay_lists_no_deliveries(self):
        response = yield self.make_client(None).get("http://cockpit/api/mail")
        self.assertEqual(200, response.code)
        self.assertEqual({"mails": []}, (yield response.json()))

    @inlineCallbacks
    def test_mail_is_handed_to_the_sender_and_202_gives_its_record(self):
        relay = config.from_dict({"mail": {"relay": {"host": "127.0.0.1", "port": 9}}}).mail.relay
        mailer = MailSender(relay, reactor, outbox=SpoolOutbox(None, reactor))  # not started: the mail waits in its queue
        client = self.make_client(mailer)
        response, record = yield self.send(client, {"to": ["ops@example.com"], "subject": "disk full",
                                                    "body": "**node!n1**", "bodytype": "md"})
        self.assertEqual(202, response.code)
        self.assertEqual((["ops@example.com"], "disk full", "queued"), (record["to"], record["subject"],
                                                                        record["state"]))
        listing = yield client.get("http://cockpit/api/mail")
        self.assertEqual([record["id"]], [m["id"] for m in (yield listing.json())["mails"]])

    @inlineCallbacks
    def test_bad_address_is_400_naming_the_field(self):
        relay = config.from_dict({"mail": {"relay": {"host": "127.0.0.1", "port": 9}}}).mail.relay
        response, payload = yield self.send(self.make_client(MailSender(relay, reactor, outbox=SpoolOutbox(None, reactor))),
                                            {"to": ["not an address"], "subject": "s", "body": "b"})
        self.assertEqual(400, response.code)
        self.assertIn("to", payload["error"])
