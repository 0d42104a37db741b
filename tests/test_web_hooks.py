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

from cockpit import config
from cockpit.bus import MemoryBus
from cockpit.smtp import MailSender
from cockpit.web import Api

SECRET = "hook-secret"
PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "acme/shop"}}


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class GithubWebhookTests(TestCase):
    def setUp(self):
        self.bus = MemoryBus(clock=Clock())
        cfg = config.from_dict({"api": {"tokens": ["t"], "github_secret": SECRET}})
        self.client = StubTreq(Api(cfg, self.bus).app.resource())

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
        for levels, message in ((100, "nests lists and objects deeper than"), (5000, "nested too deeply")):
            body = b'{"a": ' + b"[" * levels + b"]" * levels + b"}"
            response, payload = yield self.hook(body, signature=sign(body))
            self.assertEqual(400, response.code)
            self.assertIn(message, payload["error"])
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
        client = StubTreq(Api(config.from_dict({"api": {"tokens": ["t"]}}), self.bus).app.resource())
        response = yield client.post("http://cockpit/api/webhooks/github", data=json.dumps(PUSH).encode(),
                                     headers={"Content-Type": ["application/json"], "X-GitHub-Event": ["issues"],
                                              "X-GitHub-Delivery": ["d-2"]})
        self.assertEqual(202, response.code)
        yield response.json()


class MailTests(TestCase):
    def make_client(self, mailer) -> StubTreq:
        return StubTreq(Api(config.from_dict({}), MemoryBus(clock=Clock()), mailer=mailer).app.resource())

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
        mailer = MailSender(relay, reactor)  # not started: the mail waits in its queue
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
        response, payload = yield self.send(self.make_client(MailSender(relay, reactor)),
                                            {"to": ["not an address"], "subject": "s", "body": "b"})
        self.assertEqual(400, response.code)
        self.assertIn("to", payload["error"])
