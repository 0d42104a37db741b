"""The event models: one definition for validation, (de)serialisation and JSON Schema.

Every event is a JSON object with ``type``, ``guid``, ``epoch`` and ``source``; the
type-specific fields keep the names of the original cockpit's examples.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    model_validator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from cockpit import decode
from cockpit.decode import DecodeError

EVENT_TYPES = ("email", "telegram", "alarm", "eco", "generic")
# lists and objects within lists and objects, the event itself being the first level
MAX_DEPTH = decode.MAX_DEPTH
_TOO_DEEP = f"invalid event: the event nests lists and objects deeper than {MAX_DEPTH} levels"


class EventError(ValueError):
    """Input that is not a valid event; ``str()`` says what and where, in one sentence."""


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class _GuidSource:
    """uuid4 strings from one os.urandom call per 256 of them.

    uuid.uuid4() makes a system call each time, and in a thread (mail is parsed in one) a
    system call hands the GIL to the reactor and waits to get it back: per event, that wait
    costs more than making the event.
    """

    def __init__(self, batch: int = 256):
        self._batch = batch
        self._random = b""
        self._next = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if self._next >= len(self._random):
                self._random, self._next = os.urandom(16 * self._batch), 0
            chunk = self._random[self._next:self._next + 16]
            self._next += 16
        # str(uuid.UUID(bytes=chunk, version=4)), without the UUID object: version 4, variant 10x
        h = chunk.hex()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_new_guid = _GuidSource()


def _as_list(value: Any) -> Any:
    # "to: ops@example.com" is as clear as a one-element list
    if isinstance(value, str):
        return [value]
    return value


def _without_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


StrList = Annotated[list[str], BeforeValidator(_as_list)]
# numbers that every reader of the bus, in any language, takes as they are
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z
Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]
# a guid travels in SSE "id:" lines, Redis keys and URLs: a uuid, or a short token of safe characters
GUID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"


class Event(BaseModel):
    """Fields common to every event."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: str
    guid: str = Field(default_factory=_new_guid, pattern=GUID_PATTERN,
                      description="Unique id: a uuid4 made at creation unless the sender gives one "
                                  "(a uuid, or up to 100 letters, digits, '.', '_', ':' or '-').")
    # left out, the bus that publishes the event sets it from its clock (Bus.stamp); the 0 is never
    # published, so the schema does not offer it as a default
    epoch: Epoch = Field(default=0, json_schema_extra=_without_default,
                         description="Seconds since 1970: the sender's, else when the cockpit published it.")
    source: str = Field(default="api", max_length=100,
                        description="What made the event: smtp, telegram, rest, github, ays, ...")

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class EcoEvent(Event):
    """An application error condition (Jumpscale "eco")."""

    type: Literal["eco"] = "eco"
    gid: Int64 = 0
    nid: Int64 = 0
    pid: Int64 = 0
    app_name: str = ""
    eco_type: str = ""
    state: str = "NEW"
    error_msg: str = ""
    error_pub: str = ""
    category: str = ""
    func_name: str = ""
    func_filename: str = ""
    line_nbr: Int64 = 0
    code: str = ""
    backtrace: str = ""
    extra: str = ""
    last_time: Optional[Epoch] = None
    close_time: Optional[Epoch] = None
    occurence: int = Field(default=1, ge=0, le=2**63 - 1)
    tags: Union[str, list[str]] = ""

    fingerprint: str = Field(default="", max_length=200, description=(
        "What groups repeats of this error condition: the sender's own when given; else, for an eco "
        "posted with its own guid, that guid; else made from app_name, eco_type, func_filename, "
        "func_name, line_nbr and error_msg with numbers, hex ids and uuids masked."))

    @model_validator(mode="after")
    def _grouped(self) -> "EcoEvent":
        if not self.fingerprint:
            # Jumpscale's error conditions carry their own guid, which is their identity
            self.fingerprint = self.guid if "guid" in self.model_fields_set else self.default_fingerprint()
        return self

    def default_fingerprint(self) -> str:
        """The default grouping (docs/design.md §10): same app, kind, place, and message once its numbers are masked."""
        return fingerprint_of(self.app_name, self.eco_type, self.func_filename, self.func_name,
                              str(self.line_nbr), mask_variables(self.error_msg))


_VARIABLE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"  # a uuid
    r"|\b0[xX][0-9a-fA-F]+\b"  # 0x1f3a
    r"|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b"  # a hex id: digits and letters
    r"|\d+(?:\.\d+)?")  # a number


def mask_variables(message: str) -> str:
    """``message`` with its numbers, hex ids and uuids replaced by ``<n>``: what varies between repeats."""
    return _VARIABLE.sub("<n>", message)


def fingerprint_of(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


SERVICE_KEY = r"^[^!\s]+![^!\s]+$"
PATTERN_NAMES = {  # patterns, in words for errors
    SERVICE_KEY: "role!instance, such as node!web1",
    GUID_PATTERN: "a uuid, or up to 100 letters, digits, '.', '_', ':' or '-' (starting with a letter or digit)",
}


class AlarmEvent(Event):
    """A monitoring alarm about one service; the optional fields come from monitoring systems (docs/design.md §10)."""

    type: Literal["alarm"] = "alarm"
    service: str = Field(pattern=SERVICE_KEY,
                         description="The service the alarm is about, as role!instance.")
    method: str = ""
    msg: str = ""
    status: Literal["firing", "resolved"] = Field(
        "firing", description="firing, or resolved: a resolved alarm resolves its group.")
    severity: str = Field("", max_length=100, description="critical, warning, info, ... as the sender says.")
    labels: dict[str, str] = Field({}, description="The sender's labels (Alertmanager's, say).")
    annotations: dict[str, str] = Field({}, description="The sender's annotations: summary, description, ...")
    fingerprint: str = Field("", max_length=200, description="The sender's id of the alert; it groups repeats.")
    url: str = Field("", max_length=2000, description="Where the alert comes from (Alertmanager's generatorURL).")


class TelegramEvent(Event):
    """A chat command coming in (io: input) or a message going out (io: output)."""

    type: Literal["telegram"] = "telegram"
    io: Literal["input", "output"]
    action: str = Field(min_length=1, description="repo.create, bp.execute, message, ...")
    args: dict[str, Any] = {}


class EmailEvent(Event):
    """A mail received by the cockpit's SMTP server."""

    type: Literal["email"] = "email"
    from_: str = Field(default="", alias="from")
    to: StrList = []
    cc: StrList = []
    subject: str = ""
    body: str = ""
    bodytype: Literal["md", "text", "html"] = "text"
    attachments: dict[str, str] = Field(default={}, description="filename -> URL in the store")
    message_id: str = ""


class GenericEvent(Event):
    """Anything else, such as a GitHub webhook."""

    type: Literal["generic"] = "generic"
    tags: StrList = []
    args: dict[str, Any] = {}


AnyEvent = Annotated[
    Union[EmailEvent, TelegramEvent, AlarmEvent, EcoEvent, GenericEvent],
    Field(discriminator="type"),
]

MODELS: dict[str, type[Event]] = {
    "email": EmailEvent,
    "telegram": TelegramEvent,
    "alarm": AlarmEvent,
    "eco": EcoEvent,
    "generic": GenericEvent,
}

_any_event: TypeAdapter[Event] = TypeAdapter(AnyEvent)


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(event)"


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: an error message does not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """One sentence naming each wrong field by its path, e.g. ``args.chat_id: ...``."""
    parts = []
    for error in exc.errors()[:limit]:
        loc = error["loc"]
        if loc and loc[0] in MODELS:  # the discriminated union's branch name
            loc = loc[1:]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "field required"
        elif error["type"] == "string_type" and isinstance(error.get("input"), bool):
            words = "yes, on or true" if error["input"] else "no, off or false"
            message = (f"expected text, got the boolean {str(error['input']).lower()}: in YAML a bare {words} "
                       "is a boolean; quote it to send the word")
        elif error["type"] == "string_pattern_mismatch":
            pattern = error.get("ctx", {}).get("pattern", "")
            message = f"expected {PATTERN_NAMES.get(pattern, 'text matching ' + pattern)}, got {_shown(error['input'])}"
        parts.append(f"{_field_path(tuple(loc))}: {message}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "invalid event: " + "; ".join(parts)


def check_values(value: Any) -> None:
    """Raise EventError naming the field unless the event data ``value`` reads back from the bus equal.

    Too deep, a lone surrogate, an integer too long to read back, NaN or infinity, a key
    that is not text: see :func:`cockpit.decode.check`.
    """
    try:
        decode.check(value)
    except DecodeError as exc:
        raise _event_error(exc) from None


def _event_error(exc: DecodeError) -> EventError:
    if exc.problem == decode.TOO_DEEP:
        return EventError(_TOO_DEEP)
    if not exc.path:
        return EventError(exc.problem)
    return EventError(f"invalid event: {exc.where()}: {exc.problem}")


def from_data(data: Any, event_type: Optional[str] = None) -> Event:
    """Validate already-decoded data. ``event_type`` (from a URL, say) fills in or must match ``type``."""
    if not isinstance(data, dict):
        raise EventError("invalid event: expected an object (a mapping of fields), "
                         f"got {type(data).__name__}")
    check_values(data)
    if event_type is not None:
        if event_type not in MODELS:
            raise EventError(f"unknown event type {event_type!r}: expected one of {', '.join(EVENT_TYPES)}")
        given = data.get("type", event_type)
        if given != event_type:
            raise EventError(f"type: the body says {_shown(given)} but this is the {event_type!r} endpoint")
        data = {**data, "type": event_type}
    elif "type" not in data:
        raise EventError("type: field required (one of " + ", ".join(EVENT_TYPES) + ")")
    elif not isinstance(data["type"], str) or data["type"] not in MODELS:
        raise EventError(f"type: unknown event type {_shown(data['type'])}: expected one of {', '.join(EVENT_TYPES)}")
    try:
        return MODELS[data["type"]].model_validate(data)
    except ValidationError as exc:
        raise EventError(describe_validation_error(exc)) from None


def from_json(raw: Union[bytes, str], event_type: Optional[str] = None) -> Event:
    try:
        data = decode.decode_json(raw)
    except DecodeError as exc:
        raise _event_error(exc) from None
    return from_data(data, event_type)


def from_yaml(raw: Union[bytes, str], event_type: Optional[str] = None) -> Event:
    try:
        data = decode.decode_yaml(raw)
    except DecodeError as exc:
        raise _event_error(exc) from None
    return from_data(data, event_type)


def from_stored(raw: Union[bytes, str]) -> Event:
    """Decode an event this cockpit serialised itself (from the bus): the fast path."""
    return _any_event.validate_json(raw)


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each event model, by model name, with ``$defs`` hoisted for OpenAPI."""
    schemas: dict[str, dict[str, Any]] = {}
    for model in MODELS.values():
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
    return schemas
