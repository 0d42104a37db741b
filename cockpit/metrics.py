"""What ``GET /metrics`` serves: counters the ingresses, the robot and the web site bump, in Prometheus text.

Each part holds a metrics object handed in by :mod:`cockpit.tap` and calls it in one line;
:data:`NO_METRICS` is the default, so a part built by a test counts nothing. The registry is
the object's own (never prometheus_client's global one): two cockpits in one test process
do not share their counts.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# from a webhook's fraction of a second to an action's hour
RUN_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


def smtp_result(code: int) -> str:
    """The label of an SMTP answer to a message: accepted (2xx), deferred (4xx) or rejected (5xx)."""
    return "accepted" if code < 300 else "deferred" if code < 500 else "rejected"


class NullMetrics:
    """Counts nothing: what a part uses unless the service tree hands it a :class:`Metrics`."""

    def published(self, event_type: str, source: str) -> None:
        pass

    def refused(self, ingress: str, reason: str) -> None:
        pass

    def run(self, state: str, seconds: Optional[float]) -> None:
        pass

    def smtp(self, code: int) -> None:
        pass

    def http(self, code: int) -> None:
        pass


NO_METRICS = NullMetrics()


class _Pending(Collector):
    """``cockpit_bus_pending{group}``: entries each consumer group of this process holds unacknowledged."""

    def __init__(self, groups: dict[str, Callable[[], int]]):
        self.groups = groups

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("cockpit_bus_pending", "Entries handed to this process's consumers and "
                                   "not yet acknowledged, by consumer group", labels=["group"])
        for group, count in self.groups.items():
            family.add_metric([group], count())
        yield family


class Metrics(NullMetrics):
    """The cockpit's metrics, on a registry of their own; ``pending`` maps a group to its count of held entries."""

    def __init__(self, pending: Optional[dict[str, Callable[[], int]]] = None, process: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        self.pending: dict[str, Callable[[], int]] = pending if pending is not None else {}
        r = self.registry
        self._published = Counter("cockpit_events_published", "Events this process published, by type and source",
                                  ["type", "source"], registry=r)
        self._refused = Counter("cockpit_ingress_refused", "Inputs an ingress refused for now (the sender "
                                "retries), by ingress and reason", ["ingress", "reason"], registry=r)
        self._runs = Counter("cockpit_runs", "AYS runs recorded, by final state", ["state"], registry=r)
        self._run_seconds = Histogram("cockpit_run_seconds", "How long recorded AYS runs took",
                                      buckets=RUN_BUCKETS, registry=r)
        self._smtp = Counter("cockpit_smtp_messages", "Messages the SMTP server answered, by result",
                             ["result"], registry=r)
        self._http = Counter("cockpit_http_requests", "HTTP requests answered, by status code", ["code"], registry=r)
        r.register(_Pending(self.pending))
        if process:
            ProcessCollector(registry=r)

    def published(self, event_type: str, source: str) -> None:
        self._published.labels(event_type, source).inc()

    def refused(self, ingress: str, reason: str) -> None:
        self._refused.labels(ingress, reason).inc()

    def run(self, state: str, seconds: Optional[float]) -> None:
        self._runs.labels(state).inc()
        if seconds is not None:
            self._run_seconds.observe(max(seconds, 0.0))

    def smtp(self, code: int) -> None:
        result = smtp_result(code)
        self._smtp.labels(result).inc()
        if result == "deferred":
            self.refused("smtp", "unavailable")

    def http(self, code: int) -> None:
        self._http.labels(str(code)).inc()

    def render(self) -> bytes:
        """The Prometheus text format of everything registered (small: built in the reactor's thread)."""
        return generate_latest(self.registry)

