"""The Alertmanager / Grafana webhook: mapping and answers over HTTP, and against a real Alertmanager."""
from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Optional

import treq
from openapi_spec_validator import OpenAPIV31SpecValidator
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.alertmanager import (ALERT_NAMESPACE, DUPLICATE_TTL, AlertmanagerApi, labels_fingerprint,
                                  rfc3339_ns)
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.redis import RedisBus
from cockpit.bus import BusUnavailable
from cockpit.config import RedisSection
from cockpit.web import Api
from tests.cockpits import Cockpit, eventually, spawn_cockpit
from tests.redis_server import RedisServer, free_port, shared_server, started_bus

TOKEN = "am-token"
HOOK = "/api/webhooks/alertmanager"

ALERT = {
    "status": "firing",
    "labels": {"alertname": "DiskFull", "job": "node", "instance": "web1:9100", "severity": "critical",
               "mountpoint": "/var"},
    "annotations": {"summary": "/var is 91% full", "description": "only 2 GB left"},
    "startsAt": "2024-05-01T12:00:00.123456789Z",
    "endsAt": "0001-01-01T00:00:00Z",
    "generatorURL": "http://prometheus:9090/graph?g0.expr=disk_used",
    "fingerprint": "5c1e8a9f0d2b3a47",
}


def body(*alerts: dict, **top: Any) -> dict:
    """An Alertmanager webhook v4 body holding ``alerts`` (ALERT when none given)."""
    return {"version": "4", "groupKey": '{}:{alertname="DiskFull"}', "truncatedAlerts": 0, "status": "firing",
            "receiver": "cockpit", "groupLabels": {"alertname": "DiskFull"}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
            "alerts": list(alerts) if alerts else [ALERT], **top}


def alert(**changes: Any) -> dict:
    """ALERT with ``changes``; a change to ``labels`` or ``annotations`` replaces that dict."""
    changed = copy.deepcopy(ALERT)
    changed.update(changes)
    return changed


# Grafana alerting's webhook, as Grafana 9/10 sends it: version 1, more fields, times with an offset
GRAFANA = {
    "receiver": "cockpit hook", "status": "firing", "orgId": 1,
    "alerts": [{
        "status": "firing",
        "labels": {"alertname": "High memory", "grafana_folder": "Ops", "team": "blue"},
        "annotations": {"description": "memory above 90%"},
        "startsAt": "2024-05-01T14:00:03.157076+02:00", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "https://grafana.example/alerting/grafana/1afz29v7z/view", "fingerprint": "c6eadffa33fcdf37",
        "silenceURL": "https://grafana.example/alerting/silence/new", "dashboardURL": "", "panelURL": "",
        "values": {"B": 44.2, "C": 1}, "valueString": "[ var='B' value=44.2 ]"}],
    "groupLabels": {}, "commonLabels": {"team": "blue"}, "commonAnnotations": {},
    "externalURL": "https://grafana.example/", "version": "1", "groupKey": "{}:{}", "truncatedAlerts": 0,
    "title": "[FIRING:1]  (blue)", "state": "alerting", "message": "**Firing**",
}


class FailingBus(MemoryBus):
    """The embedded bus whose publish is refused for the guids in ``refuse`` (all while ``down``)."""

    def __init__(self, clock: Clock):
        super().__init__(clock=clock)
        self.down = False
        self.refuse: set[str] = set()
        self.forget_down = False

    def publish(self, event):
        if self.down or event.guid in self.refuse:
            return defer.fail(BusUnavailable("the bus is down (a test's)"))
        return super().publish(event)

    def forget(self, key):
        if self.forget_down:
            return defer.fail(BusUnavailable("the bus is down (a test's)"))
        return super().forget(key)


class Server:
    """An Api with the webhook, on a loopback port of the real reactor (big bodies parse in its threads)."""

    def __init__(self, test: TestCase, bus: Any, **api: Any):
        self.bus = bus
        self.api = Api(config.from_dict({"api": api}), bus, clock=Clock())
        self.provider = AlertmanagerApi(bus)
        self.api.include(self.provider)
        port = reactor.listenTCP(0, self.api.site(reactor), interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def post(self, payload: Any, token: Optional[str] = TOKEN, headers: Optional[dict] = None):
        """``(status, JSON reply)`` of one webhook delivery (``payload`` as bytes, or made JSON)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        sent = {"Content-Type": ["application/json"], **(headers or {})}
        if token is not None:
            sent["Authorization"] = [f"Bearer {token}"]
        response = yield treq.post(self.base + HOOK, data, headers=sent, persistent=False)
        return response.code, (yield response.json())


def guid_of(fingerprint: str, status: str, starts_at: str) -> str:
    return str(uuid.uuid5(ALERT_NAMESPACE, f"{fingerprint}/{status}/{rfc3339_ns(starts_at) or 0}"))


class MappingTests(TestCase):
    timeout = 20

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.bus = MemoryBus(clock=self.clock)
        self.server = Server(self, self.bus, tokens=[TOKEN])

    @inlineCallbacks
    def alarms(self) -> Deferred:
        """The alarm events on the bus, oldest first, as their JSON."""
        entries = yield self.bus.recent("alarm", 1000)
        return [event.to_dict() for _, event in reversed(entries)]

    @inlineCallbacks
    def test_a_firing_alert_becomes_an_alarm_event_with_every_field_mapped(self):
        code, reply = yield self.server.post(body())
        self.assertEqual((200, {"alarms": 1, "published": 1, "duplicates": 0}), (code, reply))
        [event] = yield self.alarms()
        self.assertEqual({
            "type": "alarm", "source": "alertmanager",
            "guid": guid_of("5c1e8a9f0d2b3a47", "firing", ALERT["startsAt"]),
            "epoch": 1714564800,  # 2024-05-01T12:00:00Z
            "service": "node!web1:9100", "method": "DiskFull", "msg": "/var is 91% full",
            "status": "firing", "severity": "critical", "labels": ALERT["labels"],
            "annotations": ALERT["annotations"], "fingerprint": "5c1e8a9f0d2b3a47",
            "url": "http://prometheus:9090/graph?g0.expr=disk_used"}, event)

    @inlineCallbacks
    def test_a_resolved_alert_takes_its_epoch_from_endsAt_or_else_startsAt(self):
        resolved = alert(status="resolved", endsAt="2024-05-01T12:30:00.5Z")
        no_end = alert(status="resolved", fingerprint="0000000000000001")
        code, reply = yield self.server.post(body(resolved, no_end))
        self.assertEqual((200, 2), (code, reply["published"]))
        first, second = yield self.alarms()
        self.assertEqual(("resolved", 1714566600), (first["status"], first["epoch"]))
        self.assertEqual(("resolved", 1714564800), (second["status"], second["epoch"]))
        self.assertEqual(guid_of("5c1e8a9f0d2b3a47", "resolved", ALERT["startsAt"]), first["guid"])

    @inlineCallbacks
    def test_a_firing_alert_with_no_start_is_stamped_with_the_bus_clock(self):
        self.clock.advance(42.5)
        code, _ = yield self.server.post(body(alert(startsAt="0001-01-01T00:00:00Z")))
        self.assertEqual(200, code)
        [event] = yield self.alarms()
        self.assertEqual(1_700_000_042, event["epoch"])

    @inlineCallbacks
    def test_service_comes_from_the_labels_or_the_receiver(self):
        cases = [
            ({"service": "db!pg1", "job": "node", "instance": "x"}, "cockpit", "db!pg1"),
            ({"service": "shop", "instance": "web2"}, "cockpit", "shop!web2"),
            ({"job": "node", "service": "shop"}, "cockpit", "node!-"),
            ({}, "cockpit", "cockpit!-"),
            ({"job": "black box", "instance": "https://a b/"}, "cockpit", "black_box!https://a_b/"),
            ({"service": "a!b!c"}, "cockpit", "a!b_c"),
            ({}, "", "-!-"),
        ]
        alerts = [alert(labels={**labels, "alertname": "A"}, fingerprint=f"{n:016x}")
                  for n, (labels, _, _) in enumerate(cases)]
        for (labels, receiver, _), one in zip(cases, alerts):
            code, reply = yield self.server.post(body(one, receiver=receiver))
            self.assertEqual(200, code, (labels, reply))
        self.assertEqual([expected for _, _, expected in cases], [e["service"] for e in (yield self.alarms())])

    @inlineCallbacks
    def test_msg_is_the_summary_else_the_description_else_the_alertname(self):
        alerts = [alert(annotations={"summary": "S", "description": "D"}, fingerprint="1"),
                  alert(annotations={"summary": "", "description": "D"}, fingerprint="2"),
                  alert(annotations={}, fingerprint="3"),
                  alert(labels={"job": "node"}, annotations={}, fingerprint="4")]
        code, _ = yield self.server.post(body(*alerts))
        self.assertEqual(200, code)
        self.assertEqual([("S", "DiskFull"), ("D", "DiskFull"), ("DiskFull", "DiskFull"), ("", "")],
                         [(e["msg"], e["method"]) for e in (yield self.alarms())])

    @inlineCallbacks
    def test_times_take_nine_fraction_digits_and_offsets(self):
        code, _ = yield self.server.post(body(
            alert(startsAt="2024-05-01T14:00:00.999999999+02:00", fingerprint="1"),
            alert(startsAt="2024-05-01t06:30:00-05:30", fingerprint="2"),
            alert(startsAt="2024-05-01T12:00:00z", fingerprint="3")))
        self.assertEqual(200, code)
        self.assertEqual([1714564800] * 3, [e["epoch"] for e in (yield self.alarms())])
        self.assertEqual(1714564800_999_999_999, rfc3339_ns("2024-05-01T14:00:00.999999999+02:00"))
        self.assertEqual(1714564800_100_000_000, rfc3339_ns("2024-05-01T12:00:00.1Z"))
        self.assertIsNone(rfc3339_ns("0001-01-01T00:00:00Z"))

    @inlineCallbacks
    def test_an_alert_without_fingerprint_gets_alertmanagers_from_its_sorted_labels(self):
        labels = {"alertname": "DiskFull", "instance": "web1:9100", "job": "node"}
        bare = alert(labels=labels)
        del bare["fingerprint"]
        reordered = alert(labels=dict(reversed(list(labels.items()))), fingerprint="")
        code, reply = yield self.server.post(body(bare, reordered))
        self.assertEqual((200, 1, 1), (code, reply["published"], reply["duplicates"]))
        [event] = yield self.alarms()
        self.assertEqual(labels_fingerprint(labels), event["fingerprint"])
        self.assertRegex(event["fingerprint"], "^[0-9a-f]{16}$")
        # prometheus/common's model.LabelSet{}.Fingerprint(): the FNV-1a offset basis
        self.assertEqual("cbf29ce484222325", labels_fingerprint({}))
        self.assertNotEqual(labels_fingerprint({"a": "bc"}), labels_fingerprint({"ab": "c"}))

    @inlineCallbacks
    def test_grafanas_webhook_body_is_taken_by_its_shape(self):
        code, reply = yield self.server.post(GRAFANA)
        self.assertEqual((200, {"alarms": 1, "published": 1, "duplicates": 0}), (code, reply))
        [event] = yield self.alarms()
        self.assertEqual(("cockpit_hook!-", "High memory", "memory above 90%", 1714564803, "c6eadffa33fcdf37",
                          "https://grafana.example/alerting/grafana/1afz29v7z/view", ""),
                         (event["service"], event["method"], event["msg"], event["epoch"], event["fingerprint"],
                          event["url"], event["severity"]))
        no_version = {key: value for key, value in body().items() if key != "version"}
        code, reply = yield self.server.post(no_version)
        self.assertEqual((200, 1), (code, reply["published"]))

    @inlineCallbacks
    def test_an_empty_alerts_list_is_answered_with_zeros(self):
        self.assertEqual((200, {"alarms": 0, "published": 0, "duplicates": 0}), (yield self.server.post(body() | {"alerts": []})))

    @inlineCallbacks
    def test_what_is_not_a_webhook_body_is_400_naming_the_field_and_publishes_nothing(self):
        cases = [
            (b"[1, 2]", "(body): expected a JSON object with an alerts list, got list"),
            (b"{\"alerts\": ", "invalid JSON at line 1"),
            ({"version": "4", "receiver": "x"}, "alerts: field required"),
            ({"alerts": {"status": "firing"}}, "alerts: Input should be a valid list"),
            (body(ALERT, "firing"), "alerts[1]: expected an object, got 'firing'"),
            (body(alert(status="pending")), "alerts[0].status: Input should be 'firing' or 'resolved'"),
            (body({k: v for k, v in ALERT.items() if k != "labels"}), "alerts[0].labels: field required"),
            (body(alert(labels={"alertname": 5})), "alerts[0].labels.alertname: Input should be a valid string"),
            (body(alert(startsAt="yesterday")), "alerts[0].startsAt: expected an RFC 3339 time"),
            (body(alert(startsAt="2024-05-01T12:00:00.1234567890Z")), "alerts[0].startsAt: expected an RFC 3339"),
            (body(alert(startsAt="2024-02-30T12:00:00Z")), "alerts[0].startsAt: 2024-02-30 is not a date"),
            (body(alert(startsAt="1969-12-31T23:59:59Z")), "alerts[0].startsAt: the time is before 1970"),
            (body(alert(endsAt="2024-05-01T25:00:00Z")), "alerts[0].endsAt: expected an RFC 3339 time such as"),
            (body(alert(generatorURL="http://x/" + "a" * 2000)), "alerts[0].generatorURL: String should have at most"),
            (body(alert(labels={"alertname": "A", "severity": "s" * 101})),
             "alerts[0] cannot be an alarm: severity: String should have at most 100 characters"),
            (b'{"alerts": [' + b"[" * 100 + b"]" * 100 + b"]}", "deeper than"),
        ]
        for payload, expected in cases:
            code, reply = yield self.server.post(payload)
            self.assertEqual(400, code, (payload, reply))
            self.assertIn(expected, reply["error"])
            if "cannot be an alarm" not in expected:
                self.assertTrue(reply["error"].startswith("not an Alertmanager or Grafana webhook body: "), reply)
        self.assertEqual([], (yield self.alarms()))

    @inlineCallbacks
    def test_without_the_bearer_token_it_is_401(self):
        for token in (None, "guess"):
            code, reply = yield self.server.post(body(), token=token)
            self.assertEqual(401, code)
            self.assertIn("[api] tokens", reply["error"])
        self.assertEqual([], (yield self.alarms()))

    @inlineCallbacks
    def test_a_compressed_body_is_415(self):
        code, reply = yield self.server.post(gzip.compress(json.dumps(body()).encode()),
                                             headers={"Content-Encoding": ["gzip"]})
        self.assertEqual(415, code)
        self.assertIn("Content-Encoding 'gzip' is not accepted", reply["error"])

    @inlineCallbacks
    def test_a_copy_within_ten_minutes_is_published_once_and_again_after(self):
        code, reply = yield self.server.post(body())
        self.assertEqual({"alarms": 1, "published": 1, "duplicates": 0}, reply)
        self.clock.advance(DUPLICATE_TTL - 1)
        code, reply = yield self.server.post(body(ALERT, alert(status="resolved", endsAt="2024-05-01T12:10:00Z")))
        self.assertEqual((200, {"alarms": 2, "published": 1, "duplicates": 1}), (code, reply))
        self.clock.advance(1)
        code, reply = yield self.server.post(body())
        self.assertEqual((200, {"alarms": 1, "published": 1, "duplicates": 0}), (code, reply))
        self.assertEqual(["firing", "resolved", "firing"], [e["status"] for e in (yield self.alarms())])

    @inlineCallbacks
    def test_a_body_of_many_alerts_is_parsed_off_the_reactor_and_published_whole(self):
        many = [alert(fingerprint=f"{n:016x}", annotations={"summary": f"disk {n}", "description": "x" * 200})
                for n in range(400)]
        payload = json.dumps(body(*many)).encode()
        self.assertGreater(len(payload), Api.thread_parse_over)
        code, reply = yield self.server.post(payload)
        self.assertEqual((200, {"alarms": 400, "published": 400, "duplicates": 0}), (code, reply))
        self.assertEqual([f"disk {n}" for n in range(400)], [e["msg"] for e in (yield self.alarms())])

    def test_the_document_is_valid_with_the_webhook_in_it(self):
        doc = self.server.api.openapi()
        OpenAPIV31SpecValidator(doc).validate()
        op = doc["paths"][HOOK]["post"]
        self.assertEqual(["webhooks"], op["tags"])
        self.assertEqual([{"bearer": []}], op["security"])
        self.assertEqual({"200", "400", "401", "408", "413", "415", "503"}, set(op["responses"]))
        self.assertEqual({"$ref": "#/components/schemas/WebhookPayload"},
                         op["requestBody"]["content"]["application/json"]["schema"])
        self.assertEqual({"$ref": "#/components/schemas/WebhookReply"},
                         op["responses"]["200"]["content"]["application/json"]["schema"])
        alert_schema = doc["components"]["schemas"]["WebhookAlert"]
        self.assertEqual({"status", "labels", "startsAt"}, set(alert_schema["required"]))


class BusDownTests(TestCase):
    timeout = 20

    def setUp(self):
        self.clock = Clock()
        self.bus = FailingBus(self.clock)
        self.server = Server(self, self.bus)

    def guid(self, fingerprint: str) -> str:
        return guid_of(fingerprint, "firing", ALERT["startsAt"])

    @inlineCallbacks
    def test_bus_down_is_503_and_the_claim_is_released_for_the_retry(self):
        self.bus.down = True
        code, reply = yield self.server.post(body())
        self.assertEqual(503, code)
        self.assertIn("the bus cannot take it now: none of the 1 alerts could be published", reply["error"])
        key = "ckpt.alertmanager." + uuid.UUID(self.guid(ALERT["fingerprint"])).hex
        self.assertIsNone((yield self.bus.recall(key)))
        self.bus.down = False
        code, reply = yield self.server.post(body())  # Alertmanager's retry
        self.assertEqual((200, {"alarms": 1, "published": 1, "duplicates": 0}), (code, reply))
        self.assertEqual(self.guid(ALERT["fingerprint"]), (yield self.bus.recall(key)))

    @inlineCallbacks
    def test_a_partial_failure_is_503_and_the_retry_publishes_only_the_rest(self):
        alerts = [alert(fingerprint=f"{n:016x}") for n in range(3)]
        self.bus.refuse = {self.guid(f"{1:016x}")}
        code, reply = yield self.server.post(body(*alerts))
        self.assertEqual(503, code)
        self.assertIn("1 of 3 alerts could not be published", reply["error"])
        self.bus.refuse = set()
        code, reply = yield self.server.post(body(*alerts))
        self.assertEqual((200, {"alarms": 3, "published": 1, "duplicates": 2}), (code, reply))
        published = [event.guid for _, event in reversed((yield self.bus.recent("alarm")))]
        self.assertEqual([self.guid(f"{n:016x}") for n in (0, 2, 1)], published)

    @inlineCallbacks
    def test_a_claim_that_could_not_be_released_is_released_before_the_next_body(self):
        self.bus.down = self.bus.forget_down = True
        code, _ = yield self.server.post(body())
        self.assertEqual(503, code)
        self.assertEqual(1, len(self.server.provider.owed_releases))
        code, _ = yield self.server.post(body())  # the bus still cannot release it: 503 again
        self.assertEqual(503, code)
        self.bus.down = self.bus.forget_down = False
        code, reply = yield self.server.post(body())
        self.assertEqual((200, {"alarms": 1, "published": 1, "duplicates": 0}), (code, reply))
        self.assertEqual(set(), self.server.provider.owed_releases)


class ForgetTests(TestCase):
    """``forget`` on both buses: what was remembered is gone, and the next ``remember`` stores."""

    timeout = 20

    @inlineCallbacks
    def check(self, bus):
        key = "ckpt.test.claim"
        self.assertTrue((yield bus.remember(key, "a", 60)))
        self.assertTrue((yield bus.forget(key)))
        self.assertIsNone((yield bus.recall(key)))
        self.assertFalse((yield bus.forget(key)))
        self.assertTrue((yield bus.remember(key, "b", 60)))
        self.assertEqual("b", (yield bus.recall(key)))
        self.assertRaises(ValueError, bus.forget, "test.claim")

    def test_memory_bus_forgets(self):
        clock = Clock()
        bus = MemoryBus(clock=clock)
        bus.remember("ckpt.test.old", "x", 1)
        clock.advance(2)
        self.assertFalse(self.successResultOf(bus.forget("ckpt.test.old")))  # expired: held nothing
        return self.check(bus)

    @inlineCallbacks
    def test_redis_bus_forgets(self):
        redis = shared_server()
        redis.flush()
        bus = yield started_bus(self, url=redis.url)
        yield self.check(bus)


class RedisWebhookTests(TestCase):
    """Two cockpits on one real Redis: a copy is published once whichever it reaches; a failed one is released."""

    timeout = 20

    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()
        self.servers = []
        for _ in range(2):
            bus = RedisBus(RedisSection(url=self.redis.url), reactor=reactor)
            bus.startService()
            self.addCleanup(bus.stopService)
            self.servers.append(Server(self, bus))
        return defer.gatherResults([server.bus.when_connected() for server in self.servers])

    def stored(self) -> str:
        return self.redis.command("XRANGE", "ckpt.alarm", "-", "+")

    @inlineCallbacks
    def test_copies_sent_to_two_cockpits_at_once_are_published_once(self):
        alerts = [alert(fingerprint=f"{n:016x}") for n in range(20)]
        replies = yield defer.gatherResults([server.post(body(*alerts)) for server in self.servers])
        self.assertEqual([200, 200], [code for code, _ in replies])
        self.assertEqual(20, sum(reply["published"] for _, reply in replies))
        self.assertEqual(20, sum(reply["duplicates"] for _, reply in replies))
        self.assertEqual(20, self.stored().count('"source\\":\\"alertmanager'))
        key = "ckpt.alertmanager." + uuid.UUID(guid_of(f"{0:016x}", "firing", ALERT["startsAt"])).hex
        ttl = int(self.redis.command("TTL", key).split()[-1])
        self.assertTrue(DUPLICATE_TTL - 5 < ttl <= DUPLICATE_TTL, ttl)

    @inlineCallbacks
    def test_a_refused_publish_releases_its_claim_and_the_retry_is_published(self):
        self.redis.command("SET", "ckpt.alarm", "not a stream")  # XADD fails; SET and DEL still work
        code, reply = yield self.servers[0].post(body())
        self.assertEqual(503, code)
        self.assertIn("Redis refused the event", reply["error"])
        self.assertEqual("(empty array)", self.redis.command("KEYS", "ckpt.alertmanager.*").strip())
        self.redis.command("DEL", "ckpt.alarm")
        code, reply = yield self.servers[1].post(body())  # the retry, through the other cockpit
        self.assertEqual((200, 1), (code, reply["published"]))
        self.assertIn(guid_of(ALERT["fingerprint"], "firing", ALERT["startsAt"]), self.stored())


# ---------------------------------------------------------------------------
# A real Alertmanager
# ---------------------------------------------------------------------------

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
INSTALL = "apt-get install -y prometheus-alertmanager"


class AlertmanagerProcess(protocol.ProcessProtocol):
    """``prometheus-alertmanager`` on free loopback ports, gossip off, its webhook at ``hook`` with ``token``."""

    def __init__(self, test: TestCase, hook: str, token: str = TOKEN):
        if ALERTMANAGER is None:
            test.fail(f"prometheus-alertmanager is not installed; these tests need it ({INSTALL})")
        self.output = b""
        self.ended: Deferred = Deferred()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        work = tempfile.mkdtemp(prefix="cockpit-am-")
        test.addCleanup(shutil.rmtree, work, True)
        path = os.path.join(work, "alertmanager.yml")
        with open(path, "w") as handle:
            # one group per alert, flushed at once and every half second; a repeat only after an hour
            handle.write(f"""route:
  receiver: cockpit
  group_by: ['...']
  group_wait: 50ms
  group_interval: 500ms
  repeat_interval: 1h
receivers:
  - name: cockpit
    webhook_configs:
      - url: {hook}
        send_resolved: true
        http_config:
          authorization:
            credentials: {token}
""")
        self.transport = reactor.spawnProcess(
            self, ALERTMANAGER, [ALERTMANAGER, f"--config.file={path}", f"--storage.path={work}/data",
                                 f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
                                 "--log.level=debug"], env={"PATH": os.environ.get("PATH", "")}, path=work)
        test.addCleanup(self.kill)

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def kill(self) -> Optional[Deferred]:
        if self.ended.called:
            return None
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        return self.ended

    @inlineCallbacks
    def ready(self):
        yield eventually(self._ready, timeout=20, interval=0.1, what=f"Alertmanager at {self.base}")
        return self

    @inlineCallbacks
    def _ready(self):
        if self.ended.called:
            raise AssertionError("Alertmanager ended:\n" + self.output.decode(errors="replace")[-3000:])
        try:
            response = yield treq.get(self.base + "/-/ready", persistent=False)
            yield response.content()
        except Exception:
            return False
        return response.code == 200

    @inlineCallbacks
    def post_alerts(self, *alerts: dict):
        response = yield treq.post(self.base + "/api/v2/alerts", json.dumps(list(alerts)).encode(),
                                   headers={"Content-Type": ["application/json"]}, persistent=False)
        text = yield response.text()
        assert response.code == 200, (response.code, text)

    @inlineCallbacks
    def metric(self, name: str) -> Any:
        """The value of ``name{integration="webhook"}`` on /metrics (0 when absent)."""
        response = yield treq.get(self.base + "/metrics", persistent=False)
        text = yield response.text()
        found = re.search(rf'^{name}\{{[^}}]*integration="webhook"[^}}]*\}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0


def spawn_cockpit_with_token(test: TestCase, extra: str = "") -> Cockpit:
    """A real ``twistd -n cockpit`` whose [api] takes TOKEN."""
    return spawn_cockpit(test, extra=extra, api=f'tokens = ["{TOKEN}"]')


@inlineCallbacks
def authorized(method: str, url: str) -> Any:
    response = yield treq.request(method, url, headers={"Authorization": [f"Bearer {TOKEN}"]}, persistent=False)
    return response.code, (yield response.json())


@inlineCallbacks
def alarms_of(cockpit: Cockpit) -> Any:
    """The alertmanager alarms the cockpit has, oldest first."""
    code, reply = yield authorized("GET", f"{cockpit.api}/events?type=alarm&limit=1000")
    assert code == 200, (code, reply)
    return [e for e in reversed(reply["events"]) if e["source"] == "alertmanager"]


def firing(name: str = "DiskFull", **labels: str) -> dict:
    """An alert as Prometheus posts it to Alertmanager: its start given, no end."""
    return {"labels": {"alertname": name, "job": "node", "instance": "web1:9100", "severity": "warning", **labels},
            "annotations": {"summary": f"{name} on web1"}, "startsAt": "2024-05-01T12:00:00.5Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=up"}


class RealAlertmanagerTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def start(self, extra: str = "", managers: int = 1):
        cockpit = yield spawn_cockpit_with_token(self, extra).started()
        hook = cockpit.api.removesuffix("/api") + HOOK
        ams = [AlertmanagerProcess(self, hook) for _ in range(managers)]
        yield defer.gatherResults([am.ready() for am in ams])
        return cockpit, ams

    @inlineCallbacks
    def test_a_firing_alert_arrives_as_an_alarm_event(self):
        cockpit, [am] = yield self.start()
        yield am.post_alerts(firing())
        [event] = yield eventually(lambda: alarms_of(cockpit), timeout=20, what="the alarm")
        labels = {"alertname": "DiskFull", "job": "node", "instance": "web1:9100", "severity": "warning"}
        self.assertEqual({"source": "alertmanager", "service": "node!web1:9100", "method": "DiskFull",
                          "msg": "DiskFull on web1", "status": "firing", "severity": "warning", "epoch": 1714564800,
                          "labels": labels, "annotations": {"summary": "DiskFull on web1"},
                          "fingerprint": labels_fingerprint(labels),
                          "url": "http://prometheus:9090/graph?g0.expr=up",
                          "guid": guid_of(labels_fingerprint(labels), "firing", "2024-05-01T12:00:00.5Z")},
                         {key: value for key, value in event.items() if key != "type"})

    @inlineCallbacks
    def test_an_alert_posted_again_with_its_end_past_arrives_resolved(self):
        cockpit, [am] = yield self.start()
        yield am.post_alerts(firing())
        yield eventually(lambda: alarms_of(cockpit), timeout=20, what="the firing alarm")
        yield am.post_alerts({**firing(), "endsAt": "2024-05-01T12:05:00Z"})
        events = yield eventually(
            lambda: alarms_of(cockpit).addCallback(lambda found: found if len(found) >= 2 else None),
            timeout=20, what="the resolved alarm")
        self.assertEqual([("firing", 1714564800), ("resolved", 1714565100)],
                         [(e["status"], e["epoch"]) for e in events])
        self.assertEqual(1, len({e["fingerprint"] for e in events}))

        @inlineCallbacks
        def resolved_group():
            code, page = yield authorized("GET", f"{cockpit.api}/alarms")
            groups = [g for g in page["alarms"] if g["state"] == "resolved"]
            return groups or None

        [group] = yield eventually(resolved_group, timeout=20, what="the alarm group resolved")
        self.assertEqual(("DiskFull", "node!web1:9100", 1, 1714564800, 1714565100),
                         (group["method"], group["service"], group["count"], group["first_time"], group["last_time"]))

    @inlineCallbacks
    def test_two_alertmanagers_sending_the_same_alert_publish_it_once(self):
        cockpit, ams = yield self.start(managers=2)
        yield defer.gatherResults([am.post_alerts(firing()) for am in ams])

        @inlineCallbacks
        def both_answered():
            # observed once an attempt has had its answer
            done = yield defer.gatherResults([am.metric("alertmanager_notification_latency_seconds_count")
                                              for am in ams])
            return all(count >= 1 for count in done)

        yield eventually(both_answered, timeout=20, what="a notification answered to each Alertmanager")
        for am in ams:
            self.assertNotIn(b"Notify attempt failed", am.output)
        events = yield alarms_of(cockpit)
        self.assertEqual(["DiskFull"], [e["method"] for e in events])

    @inlineCallbacks
    def test_with_redis_killed_the_webhook_is_503_and_the_retry_arrives_once_it_is_back(self):
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        cockpit, [am] = yield self.start(f'[redis]\nurl = "{redis.url}"\ntimeout = 2.0\n')
        redis.kill()
        yield am.post_alerts(firing())
        yield eventually(lambda: f"POST {HOOK} answered 503" in cockpit.log, timeout=20, what="a 503")
        yield eventually(lambda: b"unexpected status code 503" in am.output, timeout=20,
                         what="Alertmanager's record of the 503")
        redis.start()
        [event] = yield eventually(lambda: alarms_of(cockpit).addErrback(lambda _: None), timeout=40,
                                   what="the alarm, once Alertmanager retried")
        self.assertEqual(("DiskFull", "firing"), (event["method"], event["status"]))
