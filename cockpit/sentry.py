"""Sentry SDK ingest (docs/design.md §10): an unmodified Sentry SDK posts envelopes, and each error becomes an eco.

An application points its SDK at ``http://<key>@<cockpit host:port>/sentry/<project>``; the SDK
posts to ``/sentry/api/<project>/envelope/`` (or, older ones, the event JSON to ``.../store/``).
The DSN key, not a Bearer token, is the credential. Bodies come gzip, deflate, brotli or plain
and are inflated within ``[api] max_body`` as they inflate, off the reactor thread when they
may be big. Mounted with ``api.include(SentryApi(config, bus, store, clock))``.
"""
from __future__ import annotations

import hmac
import json
import re
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import parse_qs

import brotli
from pydantic import BaseModel, ConfigDict, Field
from twisted.internet import threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from cockpit import decode, events
from cockpit.bus import Bus, BusUnavailable
from cockpit.config import Config
from cockpit.decode import DecodeError
from cockpit.events import EcoEvent, EventError
from cockpit.heartbeats import NAME as HEARTBEAT_NAME, Heartbeats, clamp_timeout
from cockpit.openapi import JSON, ApiError, Body, Param, Response, RouteTable
from cockpit.web import Api, header_text

log = Logger()

ENVELOPE = "application/x-sentry-envelope"
# what SDKs label a body with; a body with no label at all (browser and Node SDKs send
# binary envelopes so) is taken as what the endpoint expects
ENVELOPE_MEDIA_TYPES = (ENVELOPE, "text/plain", "application/octet-stream", JSON)
STORE_MEDIA_TYPES = (JSON, "text/plain", "application/octet-stream")
ENCODINGS = ("gzip", "deflate", "br", "identity")
ATTACHMENTS_SPACE = "attachments"  # the store space mail attachments go to: one place for files that came in
DEFAULT_VARIABLE = re.compile(r"^\{\{\s*default\s*\}\}$")
_EVENT_ID = re.compile(r"^[0-9a-fA-F]{32}$")
_ITEM_TYPE = re.compile(r"^[a-z0-9_.-]{1,40}$")
_COUNTED_TYPES = 32  # distinct ignored item types counted by name; further ones count as "other"
MAX_CODINGS = 3  # codings one body may be wrapped in ("gzip, br", say)
_CHUNK = 65536  # bytes of compressed input handed to a decompressor at a time


class TooLarge(Exception):
    """A body that inflates past the limit: stopped where it crossed it."""


# ---------------------------------------------------------------------------
# Bodies: inflated within the limit, as they inflate
# ---------------------------------------------------------------------------

def content_encodings(value: Optional[str]) -> list[str]:
    """The codings of a Content-Encoding header in the order they were applied; ApiError 415 for another."""
    codings = [part.strip().lower() for part in (value or "").split(",") if part.strip()]
    for coding in codings:
        if coding not in ENCODINGS and coding != "x-gzip":
            raise ApiError(415, f"Content-Encoding {coding!r} is not supported: send gzip, deflate, br "
                                "or identity")
    codings = [("gzip" if coding == "x-gzip" else coding) for coding in codings if coding != "identity"]
    if len(codings) > MAX_CODINGS:
        raise ApiError(415, f"Content-Encoding lists {len(codings)} codings: at most {MAX_CODINGS} are taken")
    return codings


def inflate(raw: bytes, codings: list[str], limit: int) -> bytes:
    """``raw`` decoded by each of ``codings`` in reverse; TooLarge as soon as any output passes ``limit``."""
    data = raw
    for coding in reversed(codings):
        data = _inflate_one(data, coding, limit)
    return data


def _inflate_one(raw: bytes, coding: str, limit: int) -> bytes:
    try:
        if coding == "br":
            return _inflate_brotli(raw, limit)
        if coding == "gzip":
            return _inflate_gzip(raw, limit)
        # deflate: RFC 9110 says zlib-wrapped, but many clients send raw deflate
        if len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0:
            try:
                return _inflate_zlib(zlib.decompressobj(zlib.MAX_WBITS), raw, limit, "deflate")
            except zlib.error:
                pass  # a raw stream whose first bytes look like a zlib header
        return _inflate_zlib(zlib.decompressobj(-zlib.MAX_WBITS), raw, limit, "deflate")
    except (zlib.error, brotli.error) as exc:
        raise ApiError(400, f"the body is not valid {coding} data (Content-Encoding: {coding}): {exc}") from None


def _inflate_into(out: bytearray, inflater: Any, data: bytes, limit: int, coding: str) -> None:
    """Inflate one zlib stream (or gzip member) into ``out``, never more than one byte past ``limit``."""
    while True:
        # a bomb stops here, not once inflated
        piece = inflater.decompress(data, limit + 1 - len(out))
        out += piece
        if len(out) > limit:
            raise TooLarge()
        data = inflater.unconsumed_tail
        if inflater.eof or (not data and not piece):
            break
    if not inflater.eof:
        raise ApiError(400, f"the body's {coding} data is cut short (Content-Encoding: {coding})")


def _inflate_zlib(inflater: Any, raw: bytes, limit: int, coding: str) -> bytes:
    out = bytearray()
    _inflate_into(out, inflater, raw, limit, coding)
    if inflater.unused_data.strip(b"\0\r\n \t"):
        raise ApiError(400, f"the body has bytes after the end of its {coding} data")
    return bytes(out)


def _inflate_gzip(raw: bytes, limit: int) -> bytes:
    out = bytearray()
    rest = raw
    while True:  # a gzip file may hold several members, one after another
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        _inflate_into(out, inflater, rest, limit, "gzip")
        rest = inflater.unused_data
        if not rest.startswith(b"\x1f\x8b"):
            if rest.strip(b"\0\r\n \t"):
                raise ApiError(400, "the body has bytes after the end of its gzip data")
            return bytes(out)


def _inflate_brotli(raw: bytes, limit: int) -> bytes:
    inflater = brotli.Decompressor()
    out = bytearray()
    for start in range(0, len(raw), _CHUNK):
        out += inflater.process(raw[start:start + _CHUNK], output_buffer_limit=limit + 1 - len(out))
        if len(out) > limit:
            raise TooLarge()
        # what the decoder holds back once its output is full is asked for with empty input
        while not inflater.can_accept_more_data():
            out += inflater.process(b"", output_buffer_limit=limit + 1 - len(out))
            if len(out) > limit:
                raise TooLarge()
    if not inflater.is_finished():
        raise ApiError(400, "the body's br data is cut short (Content-Encoding: br)")
    return bytes(out)


# ---------------------------------------------------------------------------
# Envelopes: a header line, then items, each a header line and a payload
# ---------------------------------------------------------------------------

@dataclass
class Item:
    type: str
    header: dict[str, Any]
    payload: bytes


@dataclass
class Envelope:
    header: dict[str, Any]
    items: list[Item] = field(default_factory=list)


def _json_object(text: bytes, where: str) -> dict[str, Any]:
    try:
        value = decode.decode_json(text)
    except DecodeError as exc:
        if exc.path:
            raise ApiError(400, f"{where}: {exc.where()}: {exc.problem}") from None
        raise ApiError(400, f"{where}: {exc.problem}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{where}: expected a JSON object, got {_kind(value)}")
    return value


def parse_envelope(data: bytes) -> Envelope:
    """Split an envelope into its items; ApiError 400 naming the item and what was expected."""
    end = data.find(b"\n")
    end = len(data) if end < 0 else end
    envelope = Envelope(_json_object(data[:end], "the envelope header (its first line)"))
    position = end + 1
    index = 0
    while position < len(data):
        index += 1
        where = f"envelope item {index}"
        end = data.find(b"\n", position)
        if end < 0:
            end = len(data)
        line = data[position:end]
        if not line.strip():
            if data[position:].strip():
                raise ApiError(400, f"{where}: expected its header line (a JSON object), got an empty line")
            break  # blank lines closing the envelope
        header = _json_object(line, f"{where}: its header line")
        kind = header.get("type")
        if not isinstance(kind, str) or not kind:
            raise ApiError(400, f"{where}: its header has no \"type\" (event, attachment, check_in, ...)")
        where = f"envelope item {index} ({kind[:40]})"
        start = end + 1
        length = header.get("length")
        if length is None:  # the payload runs to the next newline, or the end
            stop = data.find(b"\n", start)
            stop = len(data) if stop < 0 else stop
            payload, position = data[start:stop], stop + 1
        else:
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise ApiError(400, f"{where}: \"length\" must be a whole number of bytes, got {length!r}"[:300])
            if start + length > len(data):
                raise ApiError(400, f"{where}: its header gives a length of {length} bytes, but only "
                                    f"{max(len(data) - start, 0)} follow")
            payload, stop = data[start:start + length], start + length
            if stop < len(data) and data[stop:stop + 1] != b"\n":
                raise ApiError(400, f"{where}: expected a newline after its {length}-byte payload, "
                                    f"got {data[stop:stop + 1]!r}")
            position = stop + 1
        envelope.items.append(Item(kind, header, payload))
    return envelope


# ---------------------------------------------------------------------------
# A Sentry event -> the data of an eco
# ---------------------------------------------------------------------------

def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


class _Reader:
    """Reads fields of an event, refusing a wrong type with a sentence that says where."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, expected: str, value: Any) -> ApiError:
        return ApiError(400, f"{self.where}: {path}: expected {expected}, got {_kind(value)}")

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, "an object", value)
        return value

    def values(self, value: Any, path: str) -> list[Any]:
        """A list, or Sentry's ``{"values": [...]}`` around one."""
        if value is None:
            return []
        if isinstance(value, dict):
            value, path = value.get("values"), path + ".values"
            if value is None:
                return []
        if not isinstance(value, list):
            raise self.fail(path, "a list", value)
        return value

    def text(self, value: Any, path: str) -> str:
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.fail(path, "text", value)
        return str(value)

    def integer(self, value: Any, path: str) -> int:
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, "a whole number", value)
        return value


def event_guid(value: Any, where: str) -> str:
    """A Sentry event_id (32 hex digits, or a uuid with dashes) as the 32 lower-case hex digits Sentry shows."""
    if isinstance(value, str):
        compact = value.replace("-", "") if len(value) == 36 else value
        if _EVENT_ID.match(compact) and (len(value) == 32 or _is_uuid(value)):
            return compact.lower()
    raise ApiError(400, f"{where}: event_id: expected 32 hex digits (a uuid), got {str(value)[:80]!r}")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def event_epoch(value: Any, where: str) -> float:
    """Sentry's ``timestamp``: seconds since 1970 (a number or its text) or RFC 3339 text (UTC when no zone)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    raise ApiError(400, f"{where}: timestamp: expected RFC 3339 text or seconds since 1970, "
                        f"got {str(value)[:80]!r}")


def _frames(read: _Reader, stacktrace: Any, path: str) -> list[dict[str, Any]]:
    frames = read.obj(stacktrace, path).get("frames")
    if frames is None:
        return []
    if not isinstance(frames, list):
        raise read.fail(path + ".frames", "a list", frames)
    return [read.obj(frame, f"{path}.frames[{n}]") for n, frame in enumerate(frames)]


def _frame_lines(read: _Reader, frames: list[dict[str, Any]], path: str) -> list[str]:
    lines = []
    for n, frame in enumerate(frames):
        where = f"{path}.frames[{n}]"
        filename = (read.text(frame.get("abs_path"), where + ".abs_path")
                    or read.text(frame.get("filename"), where + ".filename")
                    or read.text(frame.get("module"), where + ".module") or "?")
        lineno = read.integer(frame.get("lineno"), where + ".lineno")
        function = read.text(frame.get("function"), where + ".function") or "?"
        lines.append(f'  File "{filename}", line {lineno}, in {function}')
        context = read.text(frame.get("context_line"), where + ".context_line").strip()
        if context:
            lines.append(f"    {context}")
    return lines


def _message(read: _Reader, event: dict[str, Any]) -> str:
    logentry = read.obj(event.get("logentry"), "logentry")
    message = event.get("message")
    if isinstance(message, dict):  # an older SDK's form of logentry
        message_entry = read.obj(message, "message")
        message = (read.text(message_entry.get("formatted"), "message.formatted")
                   or read.text(message_entry.get("message"), "message.message"))
    return (read.text(logentry.get("formatted"), "logentry.formatted") or read.text(message, "message")
            or read.text(logentry.get("message"), "logentry.message"))


def _tags(read: _Reader, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = []
        for n, pair in enumerate(value):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise read.fail(f"tags[{n}]", "a [key, value] pair", pair)
            pairs.append((pair[0], pair[1]))
    else:
        raise read.fail("tags", "an object or a list of [key, value] pairs", value)
    return [f"{read.text(key, 'tags')}:{read.text(tag, f'tags.{key}')}" for key, tag in pairs]


def eco_data(event: dict[str, Any], project: str, app_name: str, now: float, where: str,
             guid: Optional[str] = None) -> dict[str, Any]:
    """The fields of the eco that a Sentry ``event`` becomes (docs/design.md §10); ApiError 400 for a wrong field.

    ``guid`` is the event's id when the event itself gives none (the envelope header's).
    """
    read = _Reader(where)
    exceptions = read.values(event.get("exception"), "exception")
    last_path = f"exception.values[{len(exceptions) - 1}]"
    last = read.obj(exceptions[-1], last_path) if exceptions else {}
    eco_type = read.text(last.get("type"), last_path + ".type")
    value = read.text(last.get("value"), last_path + ".value")
    if exceptions:
        error_msg = f"{eco_type}: {value}" if eco_type and value else (eco_type or value)
    else:
        error_msg = _message(read, event)
    error_msg = error_msg or "<unlabeled event>"

    # the backtrace: each exception, oldest first, as Python prints a chain of them
    blocks, frames = [], []
    for n, entry in enumerate(exceptions):
        path = f"exception.values[{n}]"
        entry = read.obj(entry, path)
        frames = _frames(read, entry.get("stacktrace"), path + ".stacktrace")
        kind = read.text(entry.get("type"), path + ".type")
        text = read.text(entry.get("value"), path + ".value")
        blocks.append("\n".join(["Traceback (most recent call last):", *_frame_lines(read, frames, path + ".stacktrace"),
                                 f"{kind}: {text}" if kind and text else (kind or text)]))
    if not exceptions:  # a message with a stack: the event's own, else a thread's (the crashed or current first)
        frames = _frames(read, event.get("stacktrace"), "stacktrace")
        path = "stacktrace"
        threads_ = [(n, read.obj(thread, f"threads.values[{n}]"))
                    for n, thread in enumerate(read.values(event.get("threads"), "threads"))]
        threads_.sort(key=lambda pair: not (pair[1].get("crashed") is True or pair[1].get("current") is True))
        for n, thread in threads_:
            if frames:
                break
            path = f"threads.values[{n}].stacktrace"
            frames = _frames(read, thread.get("stacktrace"), path)
        if frames:
            blocks.append("\n".join(["Stack (most recent call last):", *_frame_lines(read, frames, path)]))
    # frames of the last exception (the one raised): the last in-app frame, else the last
    chosen = next((frame for frame in reversed(frames) if frame.get("in_app") is True),
                  frames[-1] if frames else {})

    extra = {name: read.text(event.get(name), name) for name in ("level", "platform", "environment", "release")
             if event.get(name) not in (None, "")}
    data: dict[str, Any] = {
        "type": "eco", "source": "sentry",
        "guid": event_guid(event["event_id"], where) if event.get("event_id") is not None
        else guid or uuid.uuid4().hex,
        "epoch": int(event_epoch(event["timestamp"], where) if event.get("timestamp") is not None else now),
        "app_name": app_name, "eco_type": eco_type, "error_msg": error_msg,
        "func_name": read.text(chosen.get("function"), "the frame's function"),
        "func_filename": (read.text(chosen.get("filename"), "the frame's filename")
                          or read.text(chosen.get("abs_path"), "the frame's abs_path")),
        "line_nbr": read.integer(chosen.get("lineno"), "the frame's lineno"),
        "code": read.text(chosen.get("context_line"), "the frame's context_line").strip(),
        "backtrace": "\n\n".join(blocks),
        "tags": _tags(read, event.get("tags")),
        "extra": extra,  # data: made text by the caller, with the attachments' links
    }
    data["fingerprint"] = _fingerprint(read, event.get("fingerprint"), data)
    return data


def _fingerprint(read: _Reader, value: Any, data: dict[str, Any]) -> str:
    """The group of the eco: the event's ``fingerprint`` with ``{{ default }}`` the eco's default, else the default.

    Never the event_id: the eco has its guid from it, which alone would group it (docs/design.md §10).
    """
    fields = {name: data[name] for name in ("app_name", "eco_type", "func_filename", "func_name", "line_nbr",
                                            "error_msg")}
    default = EcoEvent.model_construct(**fields).default_fingerprint()
    if value is None:
        return default
    if not isinstance(value, list):
        raise read.fail("fingerprint", "a list of text", value)
    parts = [read.text(part, f"fingerprint[{n}]") for n, part in enumerate(value)]
    parts = [default if DEFAULT_VARIABLE.match(part.strip()) else part for part in parts]
    if not parts or parts == [default]:
        return default
    return events.fingerprint_of(*parts)


# ---------------------------------------------------------------------------
# What an envelope (or a store body) comes to
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckIn:
    """A ``check_in`` item: it beats the heartbeat named by its monitor (docs/design.md §11)."""

    monitor: str
    status: str  # in_progress, ok or error
    timeout: Optional[float]  # from an interval schedule and its margin; None: the heartbeat's own


_CHECK_IN_STATUSES = ("in_progress", "ok", "error")
_SCHEDULE_UNITS = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400,
                   "year": 365 * 86400}
_DEFAULT_MARGIN = 1  # minutes: Sentry's own default for checkin_margin


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
        return None
    return float(value)


def check_in_timeout(config: Any) -> Optional[float]:
    """Seconds a monitor with an interval schedule may take: the interval and its margin; None for any
    other schedule (a crontab's next run is not worked out here)."""
    if not isinstance(config, dict) or not isinstance(config.get("schedule"), dict):
        return None
    schedule = config["schedule"]
    value, unit = _number(schedule.get("value")), schedule.get("unit")
    if schedule.get("type") != "interval" or not value or unit not in _SCHEDULE_UNITS:
        return None
    margin = _number(config.get("checkin_margin"))
    return value * _SCHEDULE_UNITS[unit] + (_DEFAULT_MARGIN if margin is None else margin) * 60


def _check_in(payload: bytes, where: str) -> Optional[CheckIn]:
    """The check-in of an item, None when it names no monitor; ApiError (400) for one that is not a check-in."""
    data = _json_object(payload, where)
    monitor, status = data.get("monitor_slug"), data.get("status")
    if monitor is None:
        return None
    if not isinstance(monitor, str) or not HEARTBEAT_NAME.match(monitor):
        raise ApiError(400, f"{where}: monitor_slug is 1 to 100 letters, digits, '.', '_' or '-', "
                            f"got {str(monitor)[:100]!r}")
    if status not in _CHECK_IN_STATUSES:
        raise ApiError(400, f"{where}: status is in_progress, ok or error, got {str(status)[:40]!r}")
    timeout = check_in_timeout(data.get("monitor_config"))
    return CheckIn(monitor, status, clamp_timeout(timeout) if timeout is not None else None)


@dataclass
class Ingest:
    """What one request holds: the ecos' data, the attachments, and what else came."""

    ecos: list[tuple[EcoEvent, dict[str, Any]]] = field(default_factory=list)  # each eco, and its extra
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)  # (filename, content type, data)
    check_ins: int = 0
    beats: list[CheckIn] = field(default_factory=list)  # the check-ins that name a monitor
    ignored: list[str] = field(default_factory=list)  # item types
    reply_id: Optional[str] = None


def _raven_body(data: bytes) -> Optional[bytes]:
    """What base64 text decodes to (raven clients send zlib of the JSON so), or None for anything else."""
    import base64
    import binascii

    if data.lstrip()[:1] in (b"{", b"["):
        return None
    try:
        return base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        return None


class SentryAccepted(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = Field(description="The event's id (32 hex digits), the guid of its eco; "
                                          "null for an envelope with no event")


class SentryQuery(BaseModel):
    """What browser SDKs put in the URL instead of X-Sentry-Auth."""

    model_config = ConfigDict(extra="ignore")
    sentry_key: Optional[str] = Field(None, description="The DSN's key, when X-Sentry-Auth is not sent.")
    sentry_version: Optional[str] = Field(None, description="The Sentry protocol version (7).")
    sentry_client: Optional[str] = Field(None, description="The SDK's name and version.")


# what both ingest routes take and answer
PROJECT = {"project": Param("The DSN's project id (digits)", {"type": "string", "pattern": r"^[0-9]+$"})}
INGEST_HEADERS = {"X-Sentry-Auth": Param("Sentry sentry_key=<key>, sentry_version=7, ...", required=False),
                  "Content-Encoding": Param("gzip, deflate, br or identity", required=False)}
INGEST_RESPONSES = {200: Response("Accepted; the id of the event", SentryAccepted),
                    401: Response("No DSN key, or not one of [sentry] keys"),
                    404: Response("The project is not a project id"),
                    413: Response("The body is larger than [api] max_body, once inflated"),
                    503: Response("The bus cannot take the event now, or its attachments cannot be "
                                  "stored: refused rather than pretended")}


class SentryApi:
    """The Sentry ingest routes; ``health()`` counts what came (for /api/health).

    When the bus cannot take an event the answer is 503, as everywhere ingress refuses what it
    cannot store. sentry-python drops an envelope on any answer but 2xx, 429 included, and a 429
    would also make it drop everything else for Retry-After seconds: no status keeps the event
    in the SDK, so the one that says what happened is given.
    """

    routes = RouteTable(tag="sentry")

    def __init__(self, config: Config, bus: Bus, store: Any, clock: IReactorTime,
                 heartbeats: Optional[Heartbeats] = None):
        self.heartbeats = heartbeats  # check-ins beat its heartbeats; None: they are only counted
        self.clock = clock
        self.bus = bus
        self.store = store
        self.max_body = config.api.max_body
        self.projects = dict(config.sentry.projects)
        self._keys = [key.encode() for key in config.sentry.keys]
        self.counts: Counter[str] = Counter()
        self.ignored_types: Counter[str] = Counter()
        self.encodings: Counter[str] = Counter()  # requests accepted, by Content-Encoding

    def health(self) -> dict[str, Any]:
        return {"ok": True, "enabled": bool(self._keys), "events": self.counts["events"],
                "check_ins": self.counts["check_ins"], "attachments": self.counts["attachments"],
                "ignored": sum(self.ignored_types.values()), "ignored_types": dict(self.ignored_types),
                "refused": self.counts["refused"], "encodings": dict(self.encodings)}

    # -- the DSN key -------------------------------------------------------------------
    def _dsn_key(self, request: Request, raw: bytes) -> None:
        """The route's credential: the DSN's key from X-Sentry-Auth or ``?sentry_key=``, one of [sentry] keys."""
        try:
            if not self._keys:
                raise ApiError(401, "Sentry ingest is off: [sentry] keys is empty; add the DSN's key to it")
            given = _auth_key(header_text(request, "X-Sentry-Auth"))
            if given is None:
                query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"))
                given = query.get("sentry_key", [None])[0]
            if not given:
                raise ApiError(401, "no DSN key: send X-Sentry-Auth: Sentry sentry_key=<key>, sentry_version=7 "
                                    "or ?sentry_key=<key>, as a Sentry SDK does")
            ok = False
            for known in self._keys:  # every key compared, in constant time each
                ok |= hmac.compare_digest(given.encode("utf-8", "surrogateescape"), known)
            if not ok:
                raise ApiError(401, "the DSN key is not one of [sentry] keys")
        except ApiError:
            self.counts["refused"] += 1
            raise
        # SDKs that send binary envelopes (a browser's, Node's) label them with nothing: a body
        # with no label is what the endpoint takes
        if not request.getHeader(b"content-type"):
            label = ENVELOPE if request.path.endswith(b"/envelope/") else JSON
            request.requestHeaders.setRawHeaders(b"content-type", [label.encode()])

    # -- the routes ----------------------------------------------------------------------
    @routes.post("/sentry/api/{project}/envelope/", summary="Sentry SDK envelopes: each error becomes an eco",
                 description="What an unmodified Sentry SDK posts for the DSN "
                             "`http://<key>@<cockpit>/sentry/<project>`. The DSN key is read from "
                             "`X-Sentry-Auth` (`sentry_key=`) or the `sentry_key` query parameter and must be "
                             "one of `[sentry] keys`; `[api] tokens` do not apply. The body may be gzip, "
                             "deflate, br or plain (`Content-Encoding`), within `[api] max_body` once inflated. "
                             "Each `event` item becomes an eco with `source: sentry`; `attachment` items go "
                             "to the store and are linked from that eco's `extra`; a `check_in` item "
                             "beats the heartbeat its `monitor_slug` names (`error` fires its alarm at once); "
                             "other items are accepted and ignored. 503 when the bus cannot take "
                             "the events: the SDK drops an event on any answer but 2xx, and a cockpit "
                             "that cannot store an event says so rather than pretend.",
                 auth=False, verify=_dsn_key,
                 params=PROJECT, headers=INGEST_HEADERS,
                 query=SentryQuery,
                 body=Body({"type": "string", "description": "A Sentry envelope: a JSON header line, then items "
                            "of a JSON header line and a payload (`length` bytes when given, else one line)"},
                           ENVELOPE_MEDIA_TYPES, parse=lambda raw, kind, values: raw),
                 responses=INGEST_RESPONSES)
    async def envelope(self, request: Request, project: str, query: SentryQuery, body: bytes) -> dict[str, Any]:
        return await self._ingest(request, project, body, self._read_envelope)

    @routes.post("/sentry/api/{project}/store/", summary="Sentry's older endpoint: one event, as JSON",
                 description="The event JSON that older Sentry SDKs post (zlib and base64 from raven "
                             "clients too); keyed, encoded, mapped and answered as the envelope endpoint.",
                 auth=False, verify=_dsn_key,
                 params=PROJECT, headers=INGEST_HEADERS,
                 query=SentryQuery,
                 body=Body({"type": "object", "description": "A Sentry event"}, STORE_MEDIA_TYPES,
                           parse=lambda raw, kind, values: raw),
                 responses=INGEST_RESPONSES)
    async def store_event(self, request: Request, project: str, query: SentryQuery, body: bytes) -> dict[str, Any]:
        return await self._ingest(request, project, body, self._read_store)

    # -- the work --------------------------------------------------------------------------
    async def _ingest(self, request: Request, project: str, raw: bytes,
                      read: Callable[[bytes, list[str], str, float], Ingest]) -> dict[str, Any]:
        try:
            if not project.isdigit() or not project.isascii():
                raise ApiError(404, f"no Sentry project {project[:40]!r}: a project id is digits, as the DSN's "
                                    "last part (http://<key>@<host>/sentry/<project id>)")
            codings = content_encodings(header_text(request, "Content-Encoding"))
            now = self.clock.seconds()
            reactor: Any = getattr(getattr(request, "site", None), "reactor", None)
            # inflating (raven's base64 of zlib too) and parsing may take a while: not on the reactor thread
            if (codings or len(raw) > Api.thread_parse_over or raw.lstrip()[:1] != b"{") \
                    and hasattr(reactor, "getThreadPool"):
                found = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), read, raw, codings,
                                                        project, now)
            else:
                found = read(raw, codings, project, now)
            links = await self._store_attachments(found.attachments)
            published = []
            for eco, extra in found.ecos:
                if links:  # text made here; the rest of the eco was validated with the body
                    eco = eco.model_copy(update={"extra": json.dumps({**extra, "attachments": links},
                                                                     ensure_ascii=False)})
                published.append(eco)
            for event in published:
                await self.bus.publish(event)
            if self.heartbeats is not None:
                for check_in in found.beats:
                    await self.heartbeats.check_in(check_in.monitor, check_in.status, check_in.timeout)
        except (ApiError, EventError, BusUnavailable):
            self.counts["refused"] += 1
            raise
        self.counts["events"] += len(published)
        self.counts["check_ins"] += found.check_ins
        self.counts["attachments"] += len(found.attachments)
        self.encodings[", ".join(codings) or "identity"] += 1
        for kind in found.ignored:
            name = kind if _ITEM_TYPE.match(kind) else "other"
            if name not in self.ignored_types and len(self.ignored_types) >= _COUNTED_TYPES:
                name = "other"
            self.ignored_types[name] += 1
        if published:
            log.info("Sentry project {project}: {count} event(s) published as eco {guid}", project=project,
                     count=len(published), guid=published[0].guid)
        return {"id": found.reply_id}

    def _inflated(self, raw: bytes, codings: list[str]) -> bytes:
        try:
            return inflate(raw, codings, self.max_body)
        except TooLarge:
            raise ApiError(413, f"the body inflates to more than {self.max_body} bytes ([api] max_body)") from None

    def _read_envelope(self, raw: bytes, codings: list[str], project: str, now: float) -> Ingest:
        """Inflate, frame and map an envelope; pure, so it may run in a thread."""
        envelope = parse_envelope(self._inflated(raw, codings))
        found = Ingest()
        header_id = envelope.header.get("event_id")
        if header_id is not None:
            found.reply_id = event_guid(header_id, "the envelope header")
        for index, item in enumerate(envelope.items, 1):
            where = f"envelope item {index} ({item.type[:40]})"
            if item.type == "event":
                event = _json_object(item.payload, where)
                eco = self._validated(event, project, now, where, found.reply_id)
                found.ecos.append(eco)
                found.reply_id = found.reply_id or eco[0].guid
            elif item.type == "attachment":
                found.attachments.append(_attachment(item, index, where))
            elif item.type == "check_in":
                found.check_ins += 1
                check_in = _check_in(item.payload, where)
                if check_in is not None:
                    found.beats.append(check_in)
            else:
                found.ignored.append(item.type)
        return found

    def _read_store(self, raw: bytes, codings: list[str], project: str, now: float) -> Ingest:
        """Inflate and map the event of a /store/ body; pure, so it may run in a thread."""
        body = self._inflated(raw, codings)
        decoded = _raven_body(body)
        if decoded is not None:
            try:
                body = decoded if decoded.lstrip()[:1] == b"{" else self._inflated(decoded, ["deflate"])
            except ApiError as exc:
                if exc.status != 400:
                    raise
                raise ApiError(400, "the body is neither a JSON event nor base64 of a zlib-compressed one "
                                    "(as raven clients send)") from None
        event = _json_object(body, "the event")
        eco = self._validated(event, project, now, "the event")
        return Ingest(ecos=[eco], reply_id=eco[0].guid)

    def _validated(self, event: dict[str, Any], project: str, now: float, where: str,
                   guid: Optional[str] = None) -> tuple[EcoEvent, dict[str, Any]]:
        """The eco of a Sentry event, and its extra as data; refused here, before any file is stored."""
        data = eco_data(event, project, self.projects.get(project, project), now, where, guid)
        extra = data["extra"]
        data["extra"] = json.dumps(extra, ensure_ascii=False) if extra else ""
        try:
            eco = events.from_data(data, "eco")
        except EventError as exc:
            raise ApiError(400, f"{where}: {str(exc).removeprefix('invalid event: ')}") from None
        assert isinstance(eco, EcoEvent)
        return eco, extra

    async def _store_attachments(self, attachments: list[tuple[str, str, bytes]]) -> dict[str, str]:
        """Store each attachment (off the reactor); ``{filename: url}``, a repeated name numbered."""
        links: dict[str, str] = {}
        used: dict[str, int] = {}  # how many times a name came: numbering stays linear in their count
        if not attachments:
            return links
        if self.store is None:
            raise ApiError(503, "this cockpit has no file store for Sentry attachments")
        for filename, content_type, data in attachments:
            try:
                stored = await self.store.put(ATTACHMENTS_SPACE, data, filename, content_type)
            except OSError as exc:
                log.warn("a Sentry attachment could not be stored: {error}", error=str(exc))
                raise ApiError(503, "the attachments cannot be stored right now; try again later",
                               {"Retry-After": "5"}) from None
            name = filename
            while name in links:
                used[filename] = used.get(filename, 1) + 1
                name = f"{filename} ({used[filename]})"
            links[name] = stored.url
        return links


def _attachment(item: Item, index: int, where: str) -> tuple[str, str, bytes]:
    filename = item.header.get("filename")
    if filename is not None and not isinstance(filename, str):
        raise ApiError(400, f"{where}: \"filename\" must be text, got {_kind(filename)}")
    content_type = item.header.get("content_type")
    if content_type is not None and not isinstance(content_type, str):
        raise ApiError(400, f"{where}: \"content_type\" must be text, got {_kind(content_type)}")
    # a name for a link and a download, not a path
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1][:200] or f"attachment-{index}"
    return name, content_type or "application/octet-stream", item.payload


def _auth_key(header: Optional[str]) -> Optional[str]:
    """``sentry_key`` of an X-Sentry-Auth value (``Sentry sentry_key=..., sentry_version=7``), or None."""
    if not header:
        return None
    text = header.strip()
    if text[:7].lower() == "sentry ":
        text = text[7:]
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip() == "sentry_key":
            return value.strip()
    return None

