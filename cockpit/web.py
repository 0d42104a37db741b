"""The one Klein site: REST API under /api, the store under /store, the dashboard at /.

Routes are declared with :mod:`cockpit.openapi` (see its docstring for how); the same
declarations serve the requests and make ``/api/openapi.json``. Another module adds its
routes with ``Api.include(instance)``.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import uuid
from collections import deque
from typing import Any, Callable, Literal, NoReturn, Optional
from urllib.parse import parse_qs, quote, unquote_to_bytes, urlsplit

from klein import Klein
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from cockpit import __version__, decode, events
from cockpit.bus import STREAM_PREFIX, Bus, BusUnavailable, Subscription, cursor
from cockpit.config import ApiSection, Config
from cockpit.dashboard import Dashboard, LiveTickets
from cockpit.decode import DecodeError
from cockpit.events import EVENT_TYPES, GUID_PATTERN, AnyEvent, EventError
from cockpit.examples import SEED_YAML
from cockpit.groups_api import GroupsApi
from cockpit.metrics import CONTENT_TYPE as METRICS_TYPE, Metrics, NullMetrics
from cockpit.smtp import OutgoingMail
from cockpit.openapi import (DOCS_CSP, JSON, ApiError, Body, Param, Reply, Response, Route, RouteTable,
                             docs_asset, document)

log = Logger()

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
EVENT_MEDIA_TYPES = (JSON, *YAML_TYPES)
EventType = Literal["email", "telegram", "alarm", "eco", "generic"]


def json_body(request: Request, payload: Any, status: int = 200) -> bytes:
    """Klein answers an empty 200 for a dict: always hand it bytes with a Content-Type."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")  # a reply is data, never a page
    if isinstance(payload, BaseModel):
        return payload.model_dump_json(by_alias=True).encode()
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:  # NaN or Infinity (an action's result, say) are not JSON: null, as pydantic writes them
        return json.dumps(_finite(payload), ensure_ascii=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def json_error(request: Request, status: int, message: str) -> bytes:
    return json_body(request, {"error": message}, status)


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased ("" when absent)."""
    raw = request.getHeader(b"content-type") or b""
    return raw.split(b";", 1)[0].strip().lower().decode("latin-1")


# what a header value may not hold: control characters other than tab (twisted refuses CR, LF and NUL)
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_text(request: Request, name: str) -> Optional[str]:
    """The request header ``name`` as trimmed UTF-8 text, or None when absent.

    Raises ApiError (400) when it is given twice, is not UTF-8 or holds a control character.
    """
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"header {name}: given more than once")
    try:
        text = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"header {name}: not UTF-8 text") from None
    if _HEADER_CONTROL.search(text):
        raise ApiError(400, f"header {name}: holds a control character")
    return text.strip()


def ingress_of(path: bytes) -> str:
    """The ingress a request came in by, as a metric's label: one of a few names, whatever the path."""
    parts = path.decode(errors="replace").strip("/").split("/")
    if parts[:2] == ["api", "events"]:
        return "rest"
    if parts[:2] == ["api", "webhooks"] and len(parts) > 2 and parts[2] in ("alertmanager", "github"):
        return parts[2]
    return parts[0] if parts[0] == "sentry" else "api"


def _describe_query_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        name = ".".join(str(p) for p in error["loc"]) or "(query)"
        message = "unknown parameter" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"query parameter {name}: {message}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------
# Bodies: refused while they arrive, not after they are buffered
# ---------------------------------------------------------------------------

class BoundedRequest(Request):
    """Refuses a body over the site's ``max_body`` with 413 as soon as that is known.

    twisted.web buffers a whole body before any resource sees it, so the check sits here:
    on the announced Content-Length, and on the bytes received for a chunked body.
    """

    linger = 2.0  # seconds to drain a refused upload so the client reads the 413 instead of a reset

    _refused = False
    _received = 0
    _linger_call: Any = None

    def _limit(self) -> Optional[int]:
        return getattr(getattr(self.channel, "site", None), "max_body", None)

    def gotLength(self, length: Optional[int]) -> None:
        limit = self._limit()
        if limit is not None and length is not None and length > limit:
            self._refuse(limit)
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return  # drained and dropped
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            self.content = None
            self._refuse(limit)
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def _refuse(self, limit: int) -> None:
        self._refused = True
        # no "100 Continue" after this: the client need not send what will be dropped
        self.requestHeaders.removeHeader(b"expect")
        body = json.dumps({"error": f"the body is larger than {limit} bytes ([api] max_body)"}).encode()
        # an ApiChannel: its site, and a TCP transport's half-close, are beyond what HTTPChannel declares
        channel: Any = self.channel
        transport = channel.transport
        transport.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        log.info("refused a request body over {limit} bytes from {peer}", limit=limit,
                 peer=str(transport.getPeer()))
        # closing at once with unread input makes the kernel send a reset that can overtake the
        # reply; half-close, drop what still comes, and cut it off after a moment
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
            self._linger_call = channel.site.reactor.callLater(self.linger, transport.abortConnection)
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        if self._refused:
            return
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated


class ApiChannel(HTTPChannel):
    """HTTPChannel with deadlines on reading a request: one for its head, one for its body.

    Twisted's own timeout starts again with every byte, so a client that sends one a second
    holds a connection for ever; these deadlines do not move. A request whose head is not in
    within ``[api] header_timeout`` of its first byte (of the connection, for the first), or
    whose body is not in within ``[api] body_timeout`` of its head, is answered 408 and the
    connection closed. Once a request is read, nothing here limits how long its answer takes
    (an event stream is endless); between requests the site's idle timeout applies.
    """

    linger = 2.0  # seconds to drain input after a 408, so the client reads it instead of a reset

    _deadline: Any = None
    _reading: Optional[str] = None  # "head" or "body" while a request is read; None otherwise
    _started = False  # some of this request has come
    _expired = False
    _linger_call: Any = None
    site: ApiSite  # set by the site that builds it

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self._read("head")

    def dataReceived(self, data: bytes) -> None:
        if self._expired:
            return  # drained and dropped
        if self._reading is None and not self._handlingRequest:
            self._read("head")
        self._started = True
        super().dataReceived(data)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def lineReceived(self, line: bytes) -> None:
        if self._reading is None:  # a pipelined request, parsed from what came with the last one
            self._read("head")
            self._started = True
        super().lineReceived(line)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self.length != 0:  # else the request is complete now
            self._read("body")

    def allContentReceived(self) -> None:
        # first: handling the request may already read the next one, which sets its own deadline
        self._stop_deadline()
        super().allContentReceived()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def timeoutConnection(self) -> None:
        if self._reading is not None and self._started:  # idle mid-request: the client stalled
            phase = self._reading
            self._stop_deadline()
            self._timed_out(phase)
            return
        super().timeoutConnection()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def _read(self, phase: str) -> None:
        self._reading = phase
        period = self.site.header_timeout if phase == "head" else self.site.body_timeout
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(period)
        else:
            # callLater is Twisted's own, unannotated
            self._deadline = self.callLater(period, self._past_deadline)  # type: ignore[no-untyped-call]
        if phase == "head":
            self._started = False

    def _stop_deadline(self) -> None:
        self._reading = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _past_deadline(self) -> None:
        self._deadline = None
        phase = self._reading
        self._reading = None
        if phase == "head" and not self._started:
            # loseConnection is Twisted's own, unannotated
            self.loseConnection()  # type: ignore[no-untyped-call]  # nothing asked, nothing to answer
            return
        self._timed_out(phase or "head")

    def _timed_out(self, phase: str) -> None:
        self._expired = True
        self.setTimeout(None)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        transport: Any = self.transport  # a TCP one has the half-close ITransport does not declare
        if phase == "head":
            what, seconds, key = "headers", self.site.header_timeout, "header_timeout"
        else:
            what, seconds, key = "body", self.site.body_timeout, "body_timeout"
        log.info("a client sent its request {what} too slowly; answered 408 to {peer}", what=what,
                 peer=str(transport.getPeer()))
        request = self.requests[-1] if self.requests else None
        if not getattr(request, "_refused", False):  # a refused body has had its answer (413)
            body = json.dumps({"error": f"the request's {what} did not arrive within {seconds:g} s "
                                        f"([api] {key})"}).encode()
            transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        # as after a 413: half-close, drop what still comes, cut it off after a moment
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
            # callLater is Twisted's own, unannotated
            self._linger_call = self.callLater(self.linger, transport.abortConnection)  # type: ignore[no-untyped-call]
        else:
            transport.loseConnection()


class UndecodableUrl(Resource):
    """Answers a URL whose host or path is not UTF-8 (Klein would answer in plain text)."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return json_error(request, 400, "the URL's host or path is not UTF-8 once its %-escapes are decoded")


class ApiSite(Site):
    """The API's site: bodies within ``max_body``, deadlines on reading requests, and an idle timeout."""

    # Twisted annotates its HTTP/2-negotiating wrapper; an HTTPChannel class serves as well
    protocol = ApiChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    noisy = False  # the listener says where it listens; "Starting factory <...ApiSite object at 0x...>" says nothing

    def __init__(self, resource: Any, settings: ApiSection, metrics: Optional[NullMetrics] = None, **kwargs: Any):
        self.metrics = metrics if metrics is not None else NullMetrics()
        # form bodies are parsed by the routes that take them, within max_body
        super().__init__(  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
            resource, parsePOSTFormSubmission=False, timeout=settings.idle_timeout, **kwargs)
        self.max_body = settings.max_body
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self.displayTracebacks = False
        self.answered = 0  # requests answered below 400, which are counted rather than logged

    def getResourceFor(self, request: Request) -> Any:
        path = request.path
        try:
            request.getRequestHostname().decode("utf-8")
            (unquote_to_bytes(path) if b"%" in path else path).decode("utf-8")
        except UnicodeDecodeError:
            return UndecodableUrl()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        return super().getResourceFor(request)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def log(self, request: HTTPRequest) -> None:
        # an access line per accepted event would cost more than the event; refusals say why
        code = request.code
        self.metrics.http(code)
        if code < 400:
            self.answered += 1
            return
        log.info("{method} {path} answered {code} to {peer}", method=request.method.decode(errors="replace"),
                 path=request.path.decode(errors="replace")[:200], code=code,
                 # getClientAddress is Twisted's own, unannotated
                 peer=getattr(request.getClientAddress(), "host", "?"))  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------
# Live events
# ---------------------------------------------------------------------------

_SSE_NAME = re.compile(rb"[A-Za-z0-9_.-]{1,64}")
_SSE_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_SSE_ID_LIMIT = 256  # bytes; a longer id is left out
KEEPALIVE = b": keep-alive\n\n"


def sse_frame(name: str, event_id: str, data: bytes) -> bytes:
    """One Server-Sent Events frame that nothing it is given can split or add to.

    ``name`` must be a short token (ValueError otherwise). An ``event_id`` holding CR, LF or
    NUL is left out, so the client keeps its last id. ``data`` goes out as one ``data:``
    line per line it holds, whichever line break (CR, LF or CRLF) ends it.
    """
    encoded_name = name.encode("utf-8")
    if not _SSE_NAME.fullmatch(encoded_name):
        raise ValueError(f"{name[:80]!r} is not an event name for a stream: 1 to 64 of A-Z, a-z, 0-9, _ . -")
    parts = [b"event: ", encoded_name, b"\n"]
    try:
        encoded_id = event_id.encode("utf-8")
    except UnicodeEncodeError:
        encoded_id = b""
    if encoded_id and len(encoded_id) <= _SSE_ID_LIMIT and not any(c in encoded_id for c in (b"\r", b"\n", b"\0")):
        parts += (b"id: ", encoded_id, b"\n")
    if b"\n" in data or b"\r" in data:
        for line in _SSE_LINE_BREAK.split(data):
            parts += (b"data: ", line, b"\n")
    else:  # the event JSON: one line
        parts += (b"data: ", data, b"\n")
    parts.append(b"\n")
    return b"".join(parts)


def event_frame(event: Any) -> bytes:
    """The frame of one event (its type, guid and JSON); ValueError when it cannot be one."""
    name, event_id, data = event.type, event.guid, event.to_json()
    if not isinstance(name, str) or not isinstance(data, (bytes, str)):
        raise ValueError(f"a {type(event).__name__} has no text type or no JSON to send")
    if isinstance(data, str):
        data = data.encode("utf-8")
    return sse_frame(name, event_id if isinstance(event_id, str) else "", data)


class LiveFanout:
    """Every SSE client of one Api on one bus subscription: each event is framed once for all of them."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.streams: set["LiveStream"] = set()
        self.subscription: Optional[Subscription] = None

    def add(self, stream: "LiveStream") -> None:
        self.streams.add(stream)
        if self.subscription is None:
            self.subscription = self.bus.subscribe(self.publish)

    def remove(self, stream: "LiveStream") -> None:
        self.streams.discard(stream)
        if not self.streams and self.subscription is not None:
            subscription, self.subscription = self.subscription, None
            subscription.cancel()

    def publish(self, event: Any) -> None:
        """Hand ``event``'s frame to each stream that wants its type."""
        wanted = [stream for stream in self.streams if stream.types is None or event.type in stream.types]
        if not wanted:
            return
        try:
            frame = event_frame(event)
        except ValueError as exc:
            log.warn("an event cannot go to the live streams: {error}", error=str(exc))
            return
        for stream in wanted:
            stream.send(frame)


@implementer(IPushProducer)
class LiveStream:
    """One Server-Sent Events client: frames out, keep-alive comments, gone on disconnect.

    What the client has not read waits here, up to ``max_backlog`` bytes; a client that
    falls further behind is cut off.
    """

    def __init__(self, request: Request, fanout: LiveFanout, types: Optional[list[str]],
                 clock: IReactorTime, keepalive: float, max_backlog: int):
        self.request = request
        self.fanout = fanout
        self.types = frozenset(types) if types else None
        self.max_backlog = max_backlog
        self.paused = False
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        self.finished = False
        request.registerProducer(self, True)
        fanout.add(self)
        self.keepalive = task.LoopingCall(self._keepalive)
        self.keepalive.clock = clock
        self.keepalive.start(keepalive, now=False)
        # what the route returns: never fires; Klein cancels it when the client goes away
        self.done: Deferred[None] = Deferred(lambda _: self.stop())
        request.notifyFinish().addBoth(self.stop)

    def send(self, frame: bytes) -> None:
        if self.finished:
            return
        if self.paused or self.backlog:
            self.backlog.append(frame)
            self.backlog_bytes += len(frame)
            if self.backlog_bytes > self.max_backlog:
                self._drop()
            return
        self.request.write(frame)

    def _keepalive(self) -> None:
        if not (self.finished or self.paused or self.backlog):
            self.request.write(KEEPALIVE)

    def _drop(self) -> None:
        transport: Any = self.request.channel.transport  # abortConnection: a TCP transport's, beyond ITransport
        log.warn("an SSE client at {peer} fell {held} bytes behind ([api] live_backlog {bound}); "
                 "disconnecting it", peer=str(transport.getPeer()), held=self.backlog_bytes, bound=self.max_backlog)
        self.stop()
        transport.abortConnection()

    def stop(self, _: Any = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.backlog.clear()
        self.backlog_bytes = 0
        if self.keepalive.running:
            self.keepalive.stop()
        self.request.unregisterProducer()
        self.fanout.remove(self)  # last: whoever waits on the subscription sees the stream wholly stopped

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        backlog = self.backlog
        # a write can pause this again: what is left waits for the next resume
        while backlog and not self.paused and not self.finished:
            frame = backlog.popleft()
            self.backlog_bytes -= len(frame)
            self.request.write(frame)

    def stopProducing(self) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Models of requests and replies (the document is made from them)
# ---------------------------------------------------------------------------

class Accepted(BaseModel):
    guid: str = Field(description="The guid of the event as published.")
    duplicate: Optional[bool] = Field(None, description="Eco events only: true when an eco with this guid was "
                                                        "published within the last day. It is published "
                                                        "again; consumers count a guid once.")


class RecentQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Optional[EventType] = Field(None, description="Only events of this type.")
    limit: int = Field(50, ge=1, le=1000, description="At most this many events.")
    before: Optional[str] = Field(
        # at most 19 digits a part: Redis stream ids are two unsigned 64-bit numbers
        None, pattern=r"^[0-9]{1,19}(-[0-9]{1,19})?(/(email|telegram|alarm|eco|generic))?$",
        description="Paging: the `next` of the previous page; events older than this position.")


class EventList(BaseModel):
    events: list[AnyEvent]
    next: Optional[str] = Field(None, description="Pass as `before` for the next page; null at the end.")


class LiveQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Optional[EventType] = Field(None, description="Only events of this type.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str = Field(description="The cockpit's version.")
    bus: dict[str, Any]
    services: dict[str, dict[str, Any]]
    extensions: dict[str, dict[str, Any]] = Field(
        {}, description="Each [[servers]] extension: its kind (wsgi or service), its state (starting, running, "
                        "failed or stopped) and its last error.")


class LimitQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(50, ge=1, le=1000, description="At most this many.")


class Delivery(BaseModel):
    """What the relay has done with one mail."""

    model_config = ConfigDict(extra="allow")
    id: str
    to: list[str]
    cc: list[str] = []
    subject: str
    state: str = Field(description="queued, sent or failed")
    attempts: int
    error: Optional[str] = None
    queued: float
    sent: Optional[float] = None


class DeliveryList(BaseModel):
    mails: list[Delivery]


class WebhookAccepted(BaseModel):
    guid: Optional[str] = Field(None, description="The generic event published (none for a ping).")
    event: str
    duplicate: bool = Field(False, description="True when this delivery was published already: "
                                                 "`guid` is the event published then.")


def _event_examples(event_type: str) -> dict[str, Any]:
    import yaml

    if event_type == "generic":
        return {"generic": {"type": "generic", "tags": ["deploy"], "args": {"app": "shop", "version": "1.4.2"}}}
    return {name: yaml.safe_load(text) for name, text in SEED_YAML[event_type].items()}


def _parse_event(event_type: str) -> Callable[[bytes, str, dict[str, str]], Any]:
    def parse(raw: bytes, kind: str, _: dict[str, str]) -> Any:
        event = (events.from_json if kind == JSON else events.from_yaml)(raw, event_type)
        return event

    return parse


GITHUB_EVENT_PATTERN = r"^[a-z0-9_.-]{1,64}$"
GITHUB_DELIVERY_TTL = 86400  # seconds a delivery is remembered: a repeat within them is not published again
# the guid of a delivery's event is uuid5(this, delivery id): every process derives the same one
GITHUB_DELIVERY_NAMESPACE = uuid.UUID("6f0f4f8e-3a5e-4c62-9d2b-5b1f3c0d7a41")


ECO_GUID_TTL = 86400  # seconds an eco's guid is remembered, to tell a sender its repeat was a duplicate


def eco_guid_key(guid: str) -> str:
    """Where the bus remembers that an eco of this guid was published."""
    return f"{STREAM_PREFIX}eco.guid.{guid}"


def github_delivery_key(delivery: str) -> str:
    """Where the bus remembers that a GitHub delivery was published."""
    return f"{STREAM_PREFIX}github.delivery.{delivery}"


def _github_payload(raw: bytes, kind: str, _: dict[str, str]) -> dict[str, Any]:
    """The payload of a GitHub delivery: a JSON body, or GitHub's form body ``payload=<json>``."""
    if kind == JSON:
        text: Any = raw
    else:
        try:
            # a form body is ASCII; its %-escapes must spell UTF-8
            form = parse_qs(raw.decode("ascii"), errors="strict")
        except UnicodeError:
            raise ApiError(400, "the body is not a GitHub payload: a form body is ASCII, "
                                "with %-escapes of UTF-8 text") from None
        if "payload" not in form:
            raise ApiError(400, "the body is not a GitHub payload: the form has no payload field")
        text = form["payload"][0]
    try:
        payload = decode.decode_json(text)
    except DecodeError as exc:
        if exc.path:
            where = exc.where()
            raise ApiError(400, f"payload{'' if where.startswith('[') else '.'}{where}: {exc.problem}") from None
        raise ApiError(400, f"the body is not a GitHub payload: {exc.problem}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"the body is not a GitHub payload: expected a JSON object, got {type(payload).__name__}")
    return payload


# ---------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------

class Api:
    """The web application; given its dependencies, so a test can build one around fakes.

    ``services`` maps a name to a callable reporting that part's state (for /api/health);
    ``store`` offers ``resource()`` (mounted at /store/); ``mailer`` offers ``send(mail)``
    and ``deliveries(limit)``; ``groups`` is the
    :class:`cockpit.groups.EventGroups` served under /api/ecos and /api/alarms; ``metrics`` is what
    /metrics serves (a registry of the Api's own unless the service tree hands one in).
    """

    routes = RouteTable(tag="events")
    keepalive_interval = 15.0  # seconds between SSE keep-alive comments
    thread_parse_over = 65536  # bytes; a larger body is parsed in a thread, off the reactor

    def __init__(self, config: Config, bus: Bus, store: Any = None, mailer: Any = None,
                 services: Optional[dict[str, Callable[[], dict[str, Any]]]] = None,
                 groups: Any = None, *, clock: IReactorTime, metrics: Optional[Metrics] = None):
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.bus = bus
        self.store = store
        self.mailer = mailer
        self.groups = groups
        self.services = services if services is not None else {}
        # [[servers]]: name -> its health line; name -> (resource, public) for an app mounted at /ext/<name>
        self.extensions: dict[str, Callable[[], dict[str, Any]]] = {}
        self.mounts: dict[str, tuple[Any, bool]] = {}
        self.clock = clock
        self._tokens = [t.encode() for t in config.api.tokens]
        self.fanout = LiveFanout(bus)  # every SSE client, on one subscription
        self._document: Optional[dict[str, Any]] = None
        self.declared: list[Route] = []
        self.app = Klein()
        # Klein annotates the request as IRequest; it hands over the server.Request its site made
        self.app.handle_errors(Exception)(self._error)  # type: ignore[arg-type]
        self.include(self)
        self.include(GroupsApi(groups))
        # what lets a browser's EventSource into /api/events/live: signed with the tokens, so any cockpit takes it
        self.tickets = LiveTickets(self.clock, self._tokens)
        self.include(Dashboard(self.tickets))

    # -- the mechanism ---------------------------------------------------------------
    def include(self, provider: Any, routes: Optional[RouteTable] = None) -> None:
        """Serve and document the routes ``provider``'s class declared (or ``routes``)."""
        table = routes if routes is not None else type(provider).routes
        for route in table.routes:
            self._mount(route, route.function.__get__(provider, type(provider)), provider)
        self._document = None

    def _mount(self, route: Route, bound: Callable[..., Any], provider: Any = None) -> None:
        verify = route.verify.__get__(provider, type(provider)) if route.verify is not None else None

        def serve(request: Request, **values: str) -> Any:
            return self._serve(route, bound, verify, request, values)

        serve.__name__ = f"{route.operation_id}_{route.method}_{len(self.declared)}"
        self.app.route(route.klein_path, methods=[route.method], endpoint=serve.__name__,
                       branch=route.branch)(serve)
        self.declared.append(route)

    def _serve(self, route: Route, bound: Callable[..., Any], verify: Optional[Callable[..., None]],
               request: Request, values: dict[str, str]) -> Any:
        if route.auth and self._tokens:
            self._authenticate(request)
        raw = self._raw_body(request) if route.body is not None else b""
        if verify is not None:  # before anything else in the request is used
            verify(request, raw)
        for name, param in route.headers.items():
            self._check_header(request, name, param)
        kwargs: dict[str, Any] = {}
        if route.query is not None:
            kwargs["query"] = self._query(route.query, request)
        if route.body is not None:
            body = self._body(route, request, raw, values)
            if isinstance(body, Deferred):
                return body.addCallback(lambda parsed: self._call(route, bound, request, values,
                                                                  {**kwargs, "body": parsed}))
            kwargs["body"] = body
        return self._call(route, bound, request, values, kwargs)

    def _call(self, route: Route, bound: Callable[..., Any], request: Request, values: dict[str, str],
              kwargs: dict[str, Any]) -> Any:
        result = bound(request, **values, **kwargs)
        if route.raw:
            return result
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            return defer.ensureDeferred(result).addCallback(self._render, route, request)
        return self._render(result, route, request)

    def _render(self, result: Any, route: Route, request: Request) -> bytes:
        if isinstance(result, bytes):
            return result
        if isinstance(result, Reply):
            for name, value in result.headers.items():
                request.setHeader(name, value)
            return json_body(request, result.payload, result.status)
        return json_body(request, result, route.success_status)

    def _authenticate(self, request: Request) -> None:
        if self.tickets.admits(request):  # the live stream, opened with its ticket cookie
            return
        scheme, _, token = (request.getHeader(b"authorization") or b"").partition(b" ")
        token = token.strip()
        ok = False
        for known in self._tokens:  # every token compared, in constant time each
            ok |= hmac.compare_digest(token, known)
        if scheme.lower() != b"bearer" or not token or not ok:
            raise ApiError(401, "this call needs Authorization: Bearer <token> with one of [api] tokens"
                           if not token else "That token is not one of the cockpit's [api] tokens",
                           {"WWW-Authenticate": 'Bearer realm="cockpit"'})

    @staticmethod
    def _check_header(request: Request, name: str, param: Param) -> None:
        value = header_text(request, name)
        if value is None:
            if param.required:
                raise ApiError(400, f"header {name}: required")
            return
        pattern = param.schema.get("pattern")
        if pattern is not None and not re.search(pattern, value):  # JSON Schema: a search
            raise ApiError(400, f"header {name}: expected text matching {pattern}")

    @staticmethod
    def _query(model: type[BaseModel], request: Request) -> BaseModel:
        raw = request.uri.partition(b"?")[2].decode("latin-1")
        values = {name: found[0] for name, found in parse_qs(raw, keep_blank_values=True).items()}
        try:
            return model.model_validate(values)
        except ValidationError as exc:
            raise ApiError(400, _describe_query_error(exc)) from None

    def _raw_body(self, request: Request) -> bytes:
        limit = self.config.api.max_body
        content = request.content
        assert content is not None  # set once the request's head is in
        content.seek(0)
        raw = content.read(limit + 1)
        if len(raw) > limit:  # a site without BoundedRequest (a test's) still gets the limit
            raise ApiError(413, f"the body is larger than {limit} bytes ([api] max_body)")
        return raw

    def _body(self, route: Route, request: Request, raw: bytes, values: dict[str, str]) -> Any:
        """The parsed body, or a Deferred of it when it is big enough to be parsed in a thread."""
        body = route.body
        assert body is not None
        empty = not raw or raw.isspace()
        if empty and not body.required:
            return None  # an optional body left out needs no Content-Type
        kind = media_type(request)
        if kind not in body.media_types:
            raise ApiError(415, f"Content-Type {kind or '(none)'!r} is not accepted here: "
                           f"send one of {', '.join(body.media_types)}")
        if empty:
            raise ApiError(400, "the body is empty")
        if len(raw) > self.thread_parse_over:
            reactor: Any = getattr(getattr(request, "site", None), "reactor", None)
            if hasattr(reactor, "getThreadPool"):  # not so a test's Clock, which has no threads
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), self._parse,
                                                 body, raw, kind, values)
        return self._parse(body, raw, kind, values)

    @staticmethod
    def _parse(body: Body, raw: bytes, kind: str, values: dict[str, str]) -> Any:
        """Parse a body; pure, so it may run in a thread."""
        if body.parse is not None:
            return body.parse(raw, kind, values)
        try:
            return body.model.model_validate_json(raw)
        except ValidationError as exc:
            # the sentence is the events' one; a body that is no JSON at all has no field path to name
            message = events.describe_validation_error(exc).removeprefix("invalid event: ").removeprefix("(event): ")
            raise ApiError(400, f"invalid body: {message}") from None

    def _error(self, request: Request, failure: Failure) -> bytes:
        from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
        from werkzeug.routing import RequestRedirect

        if failure.check(ApiError):
            exc = failure.value
            for name, value in exc.headers.items():
                request.setHeader(name, value)
            return json_error(request, exc.status, exc.message)
        if failure.check(EventError):
            return json_error(request, 400, str(failure.value))
        if failure.check(BusUnavailable):
            self.metrics.refused(ingress_of(request.path), "bus_unavailable")
            log.warn("refused {method} {path}: {error}", method=request.method.decode(),
                     path=request.path.decode(errors="replace"), error=failure.getErrorMessage())
            request.setHeader(b"Retry-After", b"5")
            return json_error(request, 503, f"the bus cannot take it now: {failure.getErrorMessage()}")
        path = request.path.decode(errors="replace")
        if failure.check(MethodNotAllowed):
            allowed = sorted(failure.value.valid_methods or [])
            request.setHeader(b"Allow", ", ".join(allowed).encode())
            return json_error(request, 405, f"{request.method.decode()} is not allowed on {path}: "
                              f"use {', '.join(allowed)}")
        if failure.check(NotFound):
            return json_error(request, 404, f"no such route: {request.method.decode()} {path}")
        if failure.check(RequestRedirect):
            # werkzeug's own answer names the URL on the request's Host: a relative Location names no host
            target = urlsplit(failure.value.new_url)
            location = "/" + target.path.lstrip("/") + (f"?{target.query}" if target.query else "")
            request.setHeader(b"Location", quote(location, safe="/?&=%:@!$'()*+,;-._~").encode("ascii"))
            return json_error(request, failure.value.code, "this resource has moved: see the Location header")
        if failure.check(HTTPException):
            exc = failure.value
            return json_error(request, exc.code or 500, exc.description or exc.name)
        log.failure("unhandled error on {method} {path}", failure, method=request.method.decode(), path=path)
        return json_error(request, 500, "internal error; the cockpit's log has the details")

    def site(self, reactor: Any, **kwargs: Any) -> Site:
        """The site to listen with: ``reactor`` times its connections and parses a big body in its
        threads; ``kwargs`` go to twisted's Site."""
        root: Any = self.app.resource()
        if self.mounts:
            from cockpit.extensions import Mounts

            root = Mounts(root, self.mounts, self._authenticate, self._refusal)
        return ApiSite(root, self.config.api, metrics=self.metrics, reactor=reactor, **kwargs)

    def _refusal(self, request: Request, exc: Exception) -> bytes:
        """A mounted app's request that did not pass :meth:`_authenticate`, answered as the API would."""
        if isinstance(exc, ApiError):
            for name, value in exc.headers.items():
                request.setHeader(name, value)
            return json_body(request, {"error": exc.message}, exc.status)
        log.failure("checking a token failed", Failure(exc))
        return json_body(request, {"error": "the token could not be checked"}, 500)

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of every route mounted so far."""
        if self._document is None:
            self._document = document(
                self.declared, "Cockpit", __version__,
                "Event hub for operations teams. Every error is {\"error\": \"...\"}. "
                "Lists are newest first and page with limit and before.")
        return self._document

    # -- health and docs ---------------------------------------------------------------
    @routes.get("/api/health", summary="Liveness, and the state of the bus and of each part",
                tags=("cockpit",), auth=False,
                responses={200: Response("Everything works", Health),
                           503: Response("Something does not work (see bus and services)", Health)})
    def health(self, request: Request) -> Reply:
        bus = self.bus.health()
        parts = {name: report() for name, report in self.services.items()}
        ok = bus["ok"] and all(part.get("ok", True) for part in parts.values())
        # an extension that failed is shown, and leaves the cockpit's own status as it is
        extensions = {name: report() for name, report in self.extensions.items()}
        return Reply(200 if ok else 503, {"status": "ok" if ok else "degraded", "version": __version__,
                                          "bus": bus, "services": parts, "extensions": extensions})

    @routes.get("/metrics", summary="Prometheus metrics of this process", tags=("cockpit",), auth=False, raw=True,
                description="The Prometheus text format: events published, inputs refused, AYS runs and how long "
                            "they took, entries pending per consumer group, SMTP and HTTP answers, and the "
                            "process's CPU, memory and file descriptors. Open like /api/health.",
                responses={200: Response("The metrics", {"type": "string"}, "text/plain")})
    def metrics_text(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", METRICS_TYPE.encode())
        return self.metrics.render()

    @routes.get("/api/openapi.json", summary="This document (OpenAPI 3.1)", tags=("cockpit",), auth=False,
                responses={200: Response("The OpenAPI document", {"type": "object"})})
    def openapi_json(self, request: Request) -> dict[str, Any]:
        return self.openapi()

    # -- events ----------------------------------------------------------------------------
    for _type in EVENT_TYPES:
        def _publish_route(self: "Api", request: Request, body: Any) -> Deferred[dict[str, Any]]:
            return self.publish(body, "rest")

        routes.post(
            f"/api/events/{_type}", summary=f"Publish a{'n' if _type[0] in 'ae' else ''} {_type} event",
            description=(f"The body is a {_type} event in JSON or YAML (by Content-Type); `type` may be "
                         "left out, `guid` and `epoch` are made when absent, `source` is `rest` unless "
                         "given. The event goes to the channel and stream `ckpt." + _type + "`."),
            body=Body(events.MODELS[_type], EVENT_MEDIA_TYPES, _event_examples(_type), _parse_event(_type)),
            responses={202: Response("Published", Accepted)},
            operation_id=f"publish_{_type}")(_publish_route)
    del _type, _publish_route

    def publish(self, event: events.Event, default_source: str) -> Deferred[dict[str, Any]]:
        """Publish ``event`` (its source ``default_source`` unless the sender gave one); fires {"guid"}."""
        if "source" not in event.model_fields_set:
            event.source = default_source

        reply = self.bus.publish(event).addCallback(lambda _: {"guid": event.guid})
        if event.type == "eco":
            reply.addCallback(self._eco_seen, event.guid)
        return reply

    def _eco_seen(self, reply: dict[str, Any], guid: str) -> Deferred[dict[str, Any]]:
        """Marks the eco's guid as published (for a day); a mark already there is a duplicate."""
        marked = self.bus.remember(eco_guid_key(guid), "1", ECO_GUID_TTL)
        return marked.addCallbacks(lambda fresh: {**reply, "duplicate": not fresh},
                                   lambda failure: reply)  # published all the same: only the flag is missing

    @routes.post("/api/events/{type}", summary="Unknown event types", auth=False, hidden=True,
                 params={"type": Param()})
    def unknown_type(self, request: Request, type: str) -> None:
        raise ApiError(404, f"unknown event type {type!r}: expected one of {', '.join(EVENT_TYPES)}")

    @routes.get("/api/events", summary="Recent events from the durable log, newest first", query=RecentQuery,
                responses={200: Response("The events", EventList), 503: Response("The bus cannot be read")})
    async def recent(self, request: Request, query: RecentQuery) -> dict[str, Any]:
        try:
            entries = await self.bus.recent(query.type, query.limit, query.before)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        last = entries[-1] if len(entries) == query.limit else None
        return {"events": [event.to_dict() for _, event in entries],
                "next": cursor(last[0], last[1].type) if last else None}

    @routes.get("/api/events/live", summary="Server-Sent Events: every event as it is published",
                description="Each event is sent as `event: <type>`, `id: <guid>`, `data: <event JSON>`. "
                            "A comment line keeps the connection alive every 15 seconds. A client that "
                            "falls more than `[api] live_backlog` bytes behind is disconnected.",
                query=LiveQuery, raw=True,
                responses={200: Response("An endless event stream", {"type": "string"}, "text/event-stream")})
    def live(self, request: Request, query: LiveQuery) -> Any:
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")  # for a proxy in front
        stream = LiveStream(request, self.fanout, [query.type] if query.type else None, self.clock,
                            self.keepalive_interval, self.config.api.live_backlog)

        def subscribed(_: Any) -> None:
            # the headers leave only now: a client that sees the stream open misses nothing published after
            if not stream.finished:
                request.write(b": live events of the cockpit\n\n")

        self.bus.when_live().addCallback(subscribed)
        return stream.done

    # -- webhooks -----------------------------------------------------------------------
    def _github_signature(self, request: Request, raw: bytes) -> None:
        secret = self.config.api.github_secret
        if not secret:
            return
        given = (request.getHeader(b"x-hub-signature-256") or b"").strip()
        expected = b"sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "X-Hub-Signature-256 is missing or does not match the body"
                           if given else "X-Hub-Signature-256 is missing: [api] github_secret is set")

    @routes.post("/api/webhooks/github", summary="GitHub webhook: becomes a generic event",
                 description="Publishes `{type: generic, source: github, tags: [github, <event>], "
                             "args: {event, delivery, payload}}`. When `[api] github_secret` is set, "
                             "`X-Hub-Signature-256` must be the HMAC-SHA256 of the body; it is checked "
                             "before anything else. A ping is answered 200 and not published. A delivery "
                             "is published once: a repeat of its `X-GitHub-Delivery` within 24 hours is "
                             "answered 200 with `duplicate: true` and the guid of the event published.",
                 tags=("webhooks",), auth=False, verify=_github_signature,
                 headers={"X-GitHub-Event": Param("The GitHub event name (push, issues, ping, ...)",
                                                  {"type": "string", "pattern": GITHUB_EVENT_PATTERN}),
                          "X-GitHub-Delivery": Param("GitHub's id of this delivery",
                                                     {"type": "string", "pattern": GUID_PATTERN}),
                          "X-Hub-Signature-256": Param("sha256=<hex HMAC of the body>", required=False)},
                 body=Body({"type": "object"}, (JSON, "application/x-www-form-urlencoded"),
                           {"push": {"ref": "refs/heads/main", "repository": {"full_name": "acme/shop"}}},
                           _github_payload),
                 responses={200: Response("A ping, or a delivery published already (duplicate: true)",
                                          WebhookAccepted),
                            202: Response("Published as a generic event", WebhookAccepted),
                            401: Response("The signature is missing or wrong"),
                            503: Response("The bus cannot take it now; GitHub will redeliver")})
    async def github(self, request: Request, body: dict[str, Any]) -> Reply:
        event_name = header_text(request, "X-GitHub-Event")
        delivery = header_text(request, "X-GitHub-Delivery")
        assert event_name is not None and delivery is not None  # required, checked by the route
        if event_name == "ping":
            return Reply(200, {"guid": None, "event": "ping"})
        # through from_data, so what the bus could not read back is refused here
        event = events.from_data({
            "type": "generic", "source": "github", "tags": ["github", event_name],
            "guid": str(uuid.uuid5(GITHUB_DELIVERY_NAMESPACE, delivery)),
            "args": {"event": event_name, "delivery": delivery, "payload": body}})
        # marked only once published: a delivery whose publish failed is taken again when
        # GitHub redelivers it. Two copies at once may both be published, with one guid,
        # which every consumer counts once.
        key = github_delivery_key(delivery)
        first = await self.bus.recall(key)
        if first is not None:
            log.info("GitHub delivery {delivery} was published already, as {guid}", delivery=delivery, guid=first)
            return Reply(200, {"guid": first, "event": event_name, "duplicate": True})
        await self.bus.publish(event)
        try:
            await self.bus.remember(key, event.guid, GITHUB_DELIVERY_TTL)
        except Exception as exc:
            # published: the answer is 202 still; a redelivery would publish the same guid again
            log.warn("GitHub delivery {delivery} is published but could not be marked: {error}",
                     delivery=delivery, error=str(exc))
        return Reply(202, {"guid": event.guid, "event": event_name})

    # -- docs and store ------------------------------------------------------------------
    @routes.get("/api/docs", summary="Swagger UI for this document, served from this process",
                tags=("cockpit",), auth=False, raw=True,
                responses={200: Response("The Swagger UI page", {"type": "string"}, "text/html")})
    def docs(self, request: Request) -> bytes:
        return self._docs_file(request, "index.html")

    @routes.get("/api/docs/", summary="The Swagger UI page, with the slash a browser may add", auth=False,
                raw=True, hidden=True)
    def docs_slash(self, request: Request) -> bytes:
        return self._docs_file(request, "index.html")  # its files are named from the root: no redirect needed

    @routes.get("/api/docs/{name}", summary="Swagger UI's files", auth=False, raw=True, hidden=True)
    def docs_file(self, request: Request, name: str) -> bytes:
        return self._docs_file(request, name)

    def _docs_file(self, request: Request, name: str) -> bytes:
        found = docs_asset(name, self.openapi)
        if found is None:
            raise ApiError(404, f"no such file: /api/docs/{name}")
        content_type, data = found
        request.setHeader(b"Content-Type", content_type.encode())
        request.setHeader(b"Content-Security-Policy", DOCS_CSP.encode())
        request.setHeader(b"Cache-Control", b"no-cache")
        return data

    @routes.get("/store/{space}/{aa}/{bb}/{hash}", summary="A stored file (a mail attachment, say)",
                description="Served by its full path only, with its content type and a safe "
                            "Content-Disposition; there is no listing.",
                tags=("store",), auth=False, raw=True, branch=True,
                params={"space": Param("The store space, e.g. attachments"),
                        "aa": Param("The hash's first two hex digits"),
                        "bb": Param("The hash's next two hex digits"),
                        "hash": Param("The sha256 hex of the content")},
                responses={200: Response("The file", {"type": "string", "format": "binary"},
                                         "application/octet-stream"),
                           404: Response("No such file")})
    def stored(self, request: Request) -> Any:
        if self.store is None:
            raise ApiError(404, "this cockpit has no file store")
        return self.store.resource()

    # -- mail out ------------------------------------------------------------------------
    @routes.post("/api/mail", summary="Send a mail through [mail.relay]", tags=("mail",),
                 description="Queues the mail for the relay and answers with its delivery record; "
                             "the relay is retried with backoff. 503 when no relay is configured.",
                 body=OutgoingMail,
                 responses={202: Response("Queued; the delivery record", Delivery),
                            503: Response("No [mail.relay] is configured, the queue is full, "
                                          "or the mail cannot be stored now")})
    def send_mail(self, request: Request, body: OutgoingMail) -> Deferred[Reply]:
        if self.mailer is None:
            raise ApiError(503, "no [mail.relay] is configured; the cockpit cannot send mail")
        queued: Deferred[dict[str, Any]] = self.mailer.send(body)  # fires with the delivery record
        return queued.addCallbacks(lambda record: Reply(202, record), self._mail_refused)

    @staticmethod
    def _mail_refused(failure: Failure) -> NoReturn:
        from cockpit.outbox import MailQueueFull

        failure.trap(MailQueueFull)
        raise ApiError(503, str(failure.value), {"Retry-After": "60"})

    @routes.get("/api/mail", summary="Recent deliveries, newest first (none without a relay)", tags=("mail",),
                query=LimitQuery, responses={200: Response("The delivery records", DeliveryList)})
    def mail_deliveries(self, request: Request, query: LimitQuery) -> Deferred[dict[str, Any]]:
        if self.mailer is None:
            return defer.succeed({"mails": []})
        # the records are in Redis or the spool: they come back later
        records: Deferred[list[dict[str, Any]]] = self.mailer.deliveries(query.limit)
        return records.addCallback(lambda mails: {"mails": mails})
