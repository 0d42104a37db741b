"""The cockpit's version, /metrics and the counters behind it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

import cockpit
from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.bus import BusUnavailable
from cockpit.metrics import Metrics
from cockpit.web import Api, ingress_of
from tests.cockpits import send_mail, spawn_cockpit, subscribe_a_slow_service

ROOT = Path(__file__).parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class DownBus(MemoryBus):
    """A bus that refuses every publish while ``down``."""

    down = False

    def publish(self, event: Any) -> Any:
        if self.down:
            return defer.fail(BusUnavailable("the bus is down (a test's)"))
        return super().publish(event)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels, parsed by prometheus_client's own parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def make_api(**api_kwargs: Any) -> tuple[Api, DownBus, StubTreq]:
    bus = DownBus(clock=Clock())
    api = Api(config.from_dict({}), bus, clock=reactor, **api_kwargs)
    bus.metrics = api.metrics  # as the service tree does: the bus counts what it stores
    return api, bus, StubTreq(api.app.resource())


class VersionTests(TestCase):
    def test_twistd_cockpit_version_prints_it_and_exits_0(self):
        result = subprocess.run([TWISTD, "cockpit", "--version"], capture_output=True, text=True,
                                cwd=str(ROOT), timeout=60)
        self.assertEqual((0, f"cockpit {cockpit.__version__}\n", ""),
                         (result.returncode, result.stdout, result.stderr))

    def test_the_installed_distribution_has_the_same_version(self):
        from importlib.metadata import version

        self.assertEqual(cockpit.__version__, version("cockpit"))

    @inlineCallbacks
    def test_health_and_the_openapi_document_give_the_version(self):
        api, _, client = make_api()
        response = yield client.get("http://cockpit/api/health")
        payload = yield response.json()
        self.assertEqual((200, "ok", cockpit.__version__), (response.code, payload["status"], payload["version"]))
        self.assertEqual(cockpit.__version__, api.openapi()["info"]["version"])


class MetricsTests(TestCase):
    def setUp(self):
        self.api, self.bus, self.client = make_api()

    @inlineCallbacks
    def scrape(self) -> Any:
        response = yield self.client.get("http://cockpit/metrics")
        self.assertEqual(200, response.code)
        self.assertEqual([b"text/plain; version=0.0.4; charset=utf-8"],
                         response.headers.getRawHeaders(b"content-type"))
        return samples((yield response.text()))

    @inlineCallbacks
    def post(self, event_type: str, body: dict[str, Any]) -> Any:
        response = yield self.client.post(f"http://cockpit/api/events/{event_type}", json=body)
        yield response.content()
        return response.code

    @inlineCallbacks
    def test_events_published_over_rest_are_counted_by_type_and_source(self):
        self.assertEqual(202, (yield self.post("alarm", {"service": "node!n1", "msg": "disk full"})))
        self.assertEqual(202, (yield self.post("alarm", {"service": "node!n1", "source": "nagios"})))
        self.assertEqual(202, (yield self.post("generic", {"tags": ["x"]})))
        found = yield self.scrape()
        total = "cockpit_events_published_total"
        self.assertEqual((1.0, 1.0, 1.0),
                         (found[(total, (("source", "rest"), ("type", "alarm")))],
                          found[(total, (("source", "nagios"), ("type", "alarm")))],
                          found[(total, (("source", "rest"), ("type", "generic")))]))

    @inlineCallbacks
    def test_a_503_for_a_bus_that_is_down_counts_as_refused_and_not_published(self):
        self.bus.down = True
        self.assertEqual(503, (yield self.post("alarm", {"service": "node!n1"})))
        found = yield self.scrape()
        self.assertEqual(1.0, found[("cockpit_ingress_refused_total", (("ingress", "rest"),
                                                                       ("reason", "bus_unavailable")))])
        self.assertNotIn("cockpit_events_published_total", {name for name, _ in found})

    @inlineCallbacks
    def test_every_family_is_there_and_the_process_collector_too(self):
        found = yield self.scrape()
        names = {name for name, _ in found}
        for name in ("cockpit_run_seconds_count", "process_cpu_seconds_total",
                     "process_open_fds"):
            self.assertIn(name, names)
        response = yield self.client.get("http://cockpit/metrics")
        text = yield response.text()
        types = {family.name: family.type for family in text_string_to_metric_families(text)}
        # no consumer group in this Api: the gauge has no sample, and is declared still
        self.assertEqual({"cockpit_events_published": "counter", "cockpit_ingress_refused": "counter",
                          "cockpit_runs": "counter", "cockpit_smtp_messages": "counter",
                          "cockpit_http_requests": "counter", "cockpit_run_seconds": "histogram",
                          "cockpit_bus_pending": "gauge"},
                         {name: kind for name, kind in types.items() if name in (
                             "cockpit_events_published", "cockpit_ingress_refused", "cockpit_runs",
                             "cockpit_smtp_messages", "cockpit_http_requests", "cockpit_run_seconds",
                             "cockpit_bus_pending")})

    @inlineCallbacks
    def test_metrics_need_no_token_and_are_in_the_openapi_document_as_text(self):
        api = Api(config.from_dict({"api": {"tokens": ["t0ken"]}}), MemoryBus(clock=Clock()), clock=Clock())
        response = yield StubTreq(api.app.resource()).get("http://cockpit/metrics")
        self.assertEqual(200, response.code)
        yield response.content()
        operation = api.openapi()["paths"]["/metrics"]["get"]
        self.assertEqual({"text/plain"}, set(operation["responses"]["200"]["content"]))
        self.assertEqual([], operation["security"])  # none needed

    def test_two_apis_do_not_share_counts(self):
        first, second = Metrics(process=False), Metrics(process=False)
        first.published("alarm", "rest")
        self.assertNotIn(b'cockpit_events_published_total{source="rest",type="alarm"}', second.render())
        self.assertIn(b'cockpit_events_published_total{source="rest",type="alarm"} 1.0', first.render())

    def test_runs_smtp_answers_http_codes_and_pending_are_labelled(self):
        held = [3]
        metrics = Metrics(pending={"ays": lambda: held[0]}, process=False)
        metrics.run("ok", 2.0)
        metrics.run("error", None)
        for code in (250, 451, 554):
            metrics.smtp(code)
        metrics.http(404)
        held[0] = 5
        found = samples(metrics.render().decode())
        self.assertEqual(
            {"ok": 1.0, "error": 1.0, "seconds": 1.0, "le5": 1.0, "le1": 0.0, "accepted": 1.0, "deferred": 1.0,
             "rejected": 1.0, "smtp_refused": 1.0, "404": 1.0, "pending": 5.0},
            {"ok": found[("cockpit_runs_total", (("state", "ok"),))],
             "error": found[("cockpit_runs_total", (("state", "error"),))],
             "seconds": found[("cockpit_run_seconds_count", ())],
             "le5": found[("cockpit_run_seconds_bucket", (("le", "5.0"),))],
             "le1": found[("cockpit_run_seconds_bucket", (("le", "1.0"),))],
             "accepted": found[("cockpit_smtp_messages_total", (("result", "accepted"),))],
             "deferred": found[("cockpit_smtp_messages_total", (("result", "deferred"),))],
             "rejected": found[("cockpit_smtp_messages_total", (("result", "rejected"),))],
             "smtp_refused": found[("cockpit_ingress_refused_total", (("ingress", "smtp"),
                                                                      ("reason", "unavailable")))],
             "404": found[("cockpit_http_requests_total", (("code", "404"),))],
             "pending": found[("cockpit_bus_pending", (("group", "ays"),))]})

    def test_the_ingress_label_is_one_of_a_few_names_whatever_the_path(self):
        self.assertEqual(["rest", "alertmanager", "github", "sentry", "api", "api"],
                         [ingress_of(path) for path in (b"/api/events/alarm", b"/api/webhooks/alertmanager",
                                                        b"/api/webhooks/github", b"/sentry/api/42/envelope/",
                                                        b"/api/webhooks/x" * 50, b"/api/heartbeats/nightly")])


class RunningCockpitMetricsTests(TestCase):
    """A real cockpit: its REST, SMTP and robot hooks all count into one scrape."""

    timeout = 120

    @inlineCallbacks
    def test_rest_smtp_runs_and_http_codes_of_a_real_cockpit(self):
        import treq

        from tests.cockpits import call, eventually

        running = yield spawn_cockpit(self, extra="max_size = 2048\n").started()
        yield subscribe_a_slow_service(running.api)
        code, _ = yield call("POST", f"{running.api}/events/alarm", {"service": "node!n1", "msg": "x"})
        self.assertEqual(202, code)
        code, _ = yield call("POST", f"{running.api}/webhooks/alertmanager", {
            "version": "4", "status": "firing", "receiver": "cockpit", "alerts": [{
                "status": "firing", "labels": {"alertname": "DiskFull", "service": "node!n2"},
                "annotations": {}, "startsAt": "2026-12-01T10:00:00Z", "fingerprint": "0123456789abcdef"}]})
        self.assertEqual(200, code)
        code, text = yield threads.deferToThread(send_mail, running.smtp_port, "metrics")
        self.assertEqual(250, code, text)
        code, text = yield threads.deferToThread(send_mail, running.smtp_port, "big", "x" * 4096)
        self.assertEqual(552, code, text)
        code, _ = yield call("GET", f"{running.api}/no-such-route")
        self.assertEqual(404, code)
        base = running.api.removesuffix("/api")

        @inlineCallbacks
        def scraped() -> Any:
            response = yield treq.get(f"{base}/metrics", persistent=False)
            found = samples((yield response.text()))
            return found if found.get(("cockpit_runs_total", (("state", "ok"),)), 0) >= 1 else None

        found = yield eventually(scraped, timeout=60, what="a run counted in /metrics")
        self.assertEqual(1.0, found[("cockpit_events_published_total", (("source", "rest"), ("type", "alarm")))])
        self.assertEqual(1.0, found[("cockpit_events_published_total", (("source", "smtp"), ("type", "email")))])
        self.assertEqual(1.0, found[("cockpit_events_published_total", (("source", "alertmanager"),
                                                                        ("type", "alarm")))])
        self.assertEqual((1.0, 1.0), (found[("cockpit_smtp_messages_total", (("result", "accepted"),))],
                                      found[("cockpit_smtp_messages_total", (("result", "rejected"),))]))
        self.assertGreaterEqual(found[("cockpit_run_seconds_count", ())], 1.0)
        self.assertEqual(1.0, found[("cockpit_http_requests_total", (("code", "404"),))])
        self.assertGreaterEqual(found[("cockpit_http_requests_total", (("code", "202"),))], 1.0)
        self.assertEqual({"groups", "ays"},
                         {dict(labels)["group"] for name, labels in found if name == "cockpit_bus_pending"})
        self.assertIn(("process_resident_memory_bytes", ()), found)
        code, health = yield call("GET", f"{running.api}/health")
        self.assertEqual((200, cockpit.__version__, True, True),
                         (code, health["version"], health["services"]["store"]["ok"],
                          health["services"]["run_history"]["ok"]))
