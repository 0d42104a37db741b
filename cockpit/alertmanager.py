"""Prometheus Alertmanager and Grafana alerting webhooks -> alarm events (docs/design.md §10).

``POST /api/webhooks/alertmanager`` takes the webhook body and publishes each of its
``alerts`` as one ``alarm`` event with ``source: alertmanager``. Mounted with
``api.include(AlertmanagerApi(bus))``.

The check is by shape, not by ``version``: Alertmanager sends ``version: "4"`` and Grafana
``"1"`` (or nothing), with more fields. A body is taken when it is an object whose ``alerts``
is a list of alert objects (``status``, ``labels``, ``startsAt``; the rest optional, extra
fields allowed); ``version`` is documented and otherwise ignored.

HA Alertmanagers each send a copy. Before an alert is published, its (fingerprint, status,
startsAt) is claimed on the bus for ten minutes (SET NX on Redis: one claim wins across every
process); a copy whose claim is held is counted as a duplicate. A claim whose publish failed
is released, so that the sender's retry publishes it.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from cockpit import decode, events
from cockpit.bus import STREAM_PREFIX, Bus, BusUnavailable
from cockpit.decode import DecodeError
from cockpit.events import AlarmEvent, EventError
from cockpit.openapi import JSON, ApiError, Body, Response, RouteTable

log = Logger()

DUPLICATE_TTL = 600.0  # seconds a (fingerprint, status, startsAt) is published once
# an alert's guid is uuid5(this, "fingerprint/status/startsAt"): every process derives the same one
ALERT_NAMESPACE = uuid.UUID("0c5d3f52-8a1e-4b7e-9a57-3e3c8f2b6d10")
CLAIM_PREFIX = STREAM_PREFIX + "alertmanager."

# RFC 3339 as Go writes it (RFC3339Nano: up to 9 fraction digits), with a "Z" or an offset
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:[Zz]|([+-])(\d{2}):(\d{2}))")
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_TIME_EXAMPLE = "an RFC 3339 time such as 2024-05-01T12:00:00Z"


def rfc3339_ns(text: str) -> Optional[int]:
    """Nanoseconds since 1970 of an RFC 3339 time; None for Go's zero time (year 1: "none").

    ValueError says what is wrong with any other text, or with a time before 1970 or past 9999.
    """
    found = _RFC3339.fullmatch(text)
    if found is None:
        raise ValueError(f"expected {_TIME_EXAMPLE}")
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    if year == 1:
        return None  # Alertmanager's 0001-01-01T00:00:00Z: no time
    try:
        days = date(year, month, day).toordinal() - _EPOCH_DAY
    except ValueError:
        raise ValueError(f"{text[:10]} is not a date") from None
    offset = 0
    if found.group(8):
        off_hours, off_minutes = int(found.group(9)), int(found.group(10))
        if off_hours > 23 or off_minutes > 59:
            raise ValueError(f"expected {_TIME_EXAMPLE}: the offset is out of range")
        offset = (off_hours * 3600 + off_minutes * 60) * (1 if found.group(8) == "+" else -1)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"expected {_TIME_EXAMPLE}: the time of day is out of range")
    seconds = days * 86400 + hour * 3600 + minute * 60 + second - offset
    if not 0 <= seconds <= events.MAX_EPOCH:
        raise ValueError("the time is before 1970 or after 9999")
    return seconds * 1_000_000_000 + int((found.group(7) or "").ljust(9, "0"))


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: an error does not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _checked_time(text: str) -> str:
    try:
        rfc3339_ns(text)
    except ValueError as exc:
        raise PydanticCustomError("rfc3339", "{problem}, got {given}",
                                  {"problem": str(exc), "given": _shown(text)}) from None
    return text


Rfc3339 = Annotated[str, AfterValidator(_checked_time),
                    Field(json_schema_extra={"format": "date-time", "examples": ["2024-05-01T12:00:00.123456789Z"]})]
ZERO_TIME = "0001-01-01T00:00:00Z"


# -- the body (the document's schema comes from these) ------------------------------------

class WebhookAlert(BaseModel):
    """One alert of a webhook body; Grafana's extra fields (values, silenceURL, ...) are allowed and ignored."""

    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(description="The alert's labels: alertname, severity, job, instance, ...")
    annotations: dict[str, str] = Field({}, description="summary, description, ...")
    startsAt: Rfc3339
    endsAt: Rfc3339 = Field(ZERO_TIME, description=f"{ZERO_TIME} (Go's zero time) means none")
    generatorURL: str = Field("", max_length=2000, description="Where the alert comes from")
    fingerprint: str = Field("", max_length=200, description="The sender's id of the alert; when absent, "
                             "made from the sorted labels as Alertmanager makes it")


class WebhookPayload(BaseModel):
    """Alertmanager's webhook body (version 4), or Grafana alerting's (the same shape, more fields)."""

    model_config = ConfigDict(extra="allow")
    version: str = Field("4", description="4 from Alertmanager, 1 from some Grafana releases; "
                                          "not checked: the body's shape is")
    status: str = Field("", description="firing or resolved: the group's state")
    receiver: str = Field("", description="The receiver's name; the service's role when the labels give none")
    groupKey: str = ""
    truncatedAlerts: int = 0
    groupLabels: dict[str, str] = {}
    commonLabels: dict[str, str] = {}
    commonAnnotations: dict[str, str] = {}
    externalURL: str = ""
    alerts: list[WebhookAlert] = Field(description="Each one becomes an alarm event")


class WebhookReply(BaseModel):
    alarms: int = Field(description="Alerts in the body")
    published: int = Field(description="Alarm events published now")
    duplicates: int = Field(description="Alerts published already within 10 minutes (an HA copy, a resend)")


EXAMPLE = {
    "version": "4", "status": "firing", "receiver": "cockpit", "groupKey": '{}:{alertname="DiskFull"}',
    "truncatedAlerts": 0, "groupLabels": {"alertname": "DiskFull"}, "commonLabels": {}, "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "alerts": [{"status": "firing",
                "labels": {"alertname": "DiskFull", "job": "node", "instance": "web1:9100", "severity": "critical"},
                "annotations": {"summary": "/var is 91% full"},
                "startsAt": "2024-05-01T12:00:00.123456789Z", "endsAt": ZERO_TIME,
                "generatorURL": "http://prometheus:9090/graph?g0.expr=disk_used", "fingerprint": "5c1e8a9f0d2b3a47"}],
}


# -- the mapping ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Alarm:
    """An alert made an event, with the key that claims it."""

    event: AlarmEvent
    claim: str


def labels_fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's fingerprint of a label set: FNV-1a 64 of the sorted names and values, 0xff after each."""
    h = 0xcbf29ce484222325
    for name in sorted(labels):
        for text in (name, labels[name]):
            for byte in text.encode("utf-8", "surrogatepass"):
                h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
            h = ((h ^ 0xFF) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


_NOT_IN_A_PART = re.compile(r"[!\s]+")


def _part(text: str) -> str:
    """One side of role!instance: what the key cannot hold (a '!' or white space) becomes '_'."""
    return _NOT_IN_A_PART.sub("_", text) or "-"


def service_of(labels: dict[str, str], receiver: str) -> str:
    """``labels.service`` when it holds a '!', else ``<job, service or receiver>!<instance or ->``."""
    service = labels.get("service", "")
    if "!" in service:
        role, _, instance = service.partition("!")
    else:
        role, instance = labels.get("job") or service or receiver, labels.get("instance", "")
    return f"{_part(role)}!{_part(instance)}"


def alarm_of(alert: WebhookAlert, receiver: str) -> Alarm:
    """The alarm event of one alert (docs/design.md §10) and its claim key; EventError when it cannot be one."""
    labels, annotations = alert.labels, alert.annotations
    starts = rfc3339_ns(alert.startsAt)
    when = rfc3339_ns(alert.endsAt) if alert.status == "resolved" else starts
    if when is None:
        when = starts  # a resolved alert with no end: when it began
    fingerprint = alert.fingerprint or labels_fingerprint(labels)
    guid = uuid.uuid5(ALERT_NAMESPACE, f"{fingerprint}/{alert.status}/{starts or 0}")
    alertname = labels.get("alertname", "")
    data: dict[str, Any] = {
        "type": "alarm", "source": "alertmanager", "guid": str(guid),
        "service": service_of(labels, receiver), "method": alertname,
        "msg": annotations.get("summary") or annotations.get("description") or alertname,
        "status": alert.status, "severity": labels.get("severity", ""), "labels": labels,
        "annotations": annotations, "fingerprint": fingerprint, "url": alert.generatorURL}
    if when is not None:  # else the bus stamps it with its clock when it publishes
        data["epoch"] = when // 1_000_000_000
    event = events.from_data(data)
    assert isinstance(event, AlarmEvent)  # "type": "alarm" makes it one
    return Alarm(event, CLAIM_PREFIX + guid.hex)


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors as one sentence naming each field by its path (``alerts[2].startsAt``)."""
    parts = []
    for error in exc.errors()[:3]:
        where = decode.format_path(tuple(error["loc"])) or "(body)"
        kind = error["type"]
        if kind == "missing":
            message = "field required"
        elif kind in ("dict_type", "model_type") and not error["loc"]:
            message = f"expected a JSON object with an alerts list, got {type(error['input']).__name__}"
        elif kind in ("dict_type", "model_type"):
            message = f"expected an object, got {_shown(error['input'])}"
        else:
            message = error["msg"]
        parts.append(f"{where}: {message}")
    more = len(exc.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more")
    return "not an Alertmanager or Grafana webhook body: " + "; ".join(parts)


def parse_webhook(raw: bytes, kind: str, _: dict[str, str]) -> list[Alarm]:
    """The alarms of a webhook body; ApiError (400) naming the field. Pure: it may run in a thread."""
    try:
        data = decode.decode_json(raw)
    except DecodeError as exc:
        where = f"{exc.where()}: " if exc.path else ""
        raise ApiError(400, f"not an Alertmanager or Grafana webhook body: {where}{exc.problem}") from None
    try:
        payload = WebhookPayload.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, _describe(exc)) from None
    alarms = []
    for i, alert in enumerate(payload.alerts):
        try:
            alarms.append(alarm_of(alert, payload.receiver))
        except EventError as exc:
            raise ApiError(400, f"alerts[{i}] cannot be an alarm: {str(exc).removeprefix('invalid event: ')}") from None
    return alarms


# -- the route -----------------------------------------------------------------------------

class AlertmanagerApi:
    """The Alertmanager/Grafana webhook on ``bus``."""

    routes = RouteTable(tag="webhooks")

    def __init__(self, bus: Bus):
        self.bus = bus
        # claims whose release failed (the bus was away): released before the next body is taken,
        # so that the retry of what they claimed is not taken for a duplicate
        self.owed_releases: set[str] = set()

    def _identity_only(self, request: Request, raw: bytes) -> None:
        encoding = (request.getHeader(b"content-encoding") or b"identity").strip().lower()
        if encoding != b"identity":
            raise ApiError(415, f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not accepted here: "
                                "send the JSON body as it is")

    @routes.post("/api/webhooks/alertmanager", summary="Alertmanager or Grafana webhook: each alert an alarm event",
                 description=(
                     "Takes Alertmanager's webhook body (version 4) or Grafana alerting's (same shape, more fields; "
                     "the shape is checked, not `version`). Each entry of `alerts` becomes an `alarm` event with "
                     "`source: alertmanager`: `service` is `labels.service` when it holds a `!`, else "
                     "`<job|service|receiver>!<instance|->`; `method` the alertname; `msg` the summary, description "
                     "or alertname; `epoch` startsAt (firing) or endsAt (resolved); `url` the generatorURL. "
                     "An alert with the same (fingerprint, status, startsAt) within 10 minutes is published once "
                     "(HA Alertmanagers each send a copy). 200 once every alert is on the bus; 503 when the bus "
                     "cannot take them all (Alertmanager retries a 5xx; what was published is not published again). "
                     "Configure the receiver's `http_config.authorization.credentials` with one of `[api] tokens`."),
                 verify=_identity_only,
                 body=Body(WebhookPayload, (JSON,), {"alertmanager": EXAMPLE}, parse_webhook),
                 responses={200: Response("Every alert is on the bus (published now, or before)", WebhookReply),
                            415: Response("Not JSON, or a Content-Encoding other than identity"),
                            503: Response("The bus cannot take them now; Alertmanager retries")})
    async def alertmanager_webhook(self, request: Request, body: list[Alarm]) -> dict[str, int]:
        if self.owed_releases:
            await self._release_owed()
        # a result is True, False or, where ``ok`` is False, a Failure: Twisted's types leave the Failure out
        outcomes: list[tuple[bool, Any]] = await defer.DeferredList([self._publish_once(alarm) for alarm in body],
                                                                    consumeErrors=True)
        failures: list[Failure] = [result for ok, result in outcomes if not ok]
        if failures:
            for failure in failures:
                if not failure.check(BusUnavailable):  # a refusal by Redis, say: the retry may get through
                    log.failure("an alert could not be published", failure)
            error = failures[0].getErrorMessage()
            if len(failures) == len(body):
                raise BusUnavailable(f"none of the {len(body)} alerts could be published ({error})")
            raise BusUnavailable(f"{len(failures)} of {len(body)} alerts could not be published ({error}); "
                                 "the others are, and a retry does not publish them again")
        published = sum(1 for _, result in outcomes if result)
        return {"alarms": len(body), "published": published, "duplicates": len(body) - published}

    def _publish_once(self, alarm: Alarm) -> Deferred[bool]:
        """Claim, then publish; fires True when published, False for a duplicate."""
        def claimed(stored: bool) -> Any:
            if not stored:
                return False
            return self.bus.publish(alarm.event).addCallbacks(lambda _: True, self._release, errbackArgs=(alarm,))

        def not_claimed(failure: Failure) -> Failure:
            # the claim may have been stored before the answer was lost: released later, to be safe
            self.owed_releases.add(alarm.claim)
            return failure

        return self.bus.remember(alarm.claim, alarm.event.guid, DUPLICATE_TTL).addCallbacks(claimed, not_claimed)

    def _release(self, failure: Failure, alarm: Alarm) -> Deferred[Failure]:
        def kept(release_failure: Failure) -> None:
            log.warn("the claim of alert {guid} could not be released ({error}); it will be, before the next "
                     "body is taken", guid=alarm.event.guid, error=release_failure.getErrorMessage())
            self.owed_releases.add(alarm.claim)

        d = self.bus.forget(alarm.claim).addErrback(kept)
        return d.addCallback(lambda _: failure)

    async def _release_owed(self) -> None:
        """Release the claims owed; BusUnavailable (a 503) while the bus is still away."""
        owed = list(self.owed_releases)
        await defer.gatherResults([self.bus.forget(key) for key in owed], consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)
        self.owed_releases.difference_update(owed)
        log.info("released {count} claims of alerts whose publish had failed", count=len(owed))
