"""Silences (maintenance windows, docs/design.md §11): matchers over a group's fields, in force between two times.

A silence holds back the notices of the groups it matches while it is in force; the groups are
still counted. The notices that use it ask :meth:`SilenceStore.active` which silences hold, and
:meth:`SilenceStore.claim_ended` which ended, once across every process, so that the groups it held
back are notified when it ends. Where silences live is the backend's (:mod:`cockpit.backends`):
Redis, shared by every process, or this process's memory.
"""
from __future__ import annotations

import fnmatch
import re
import uuid
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from cockpit.openapi import ApiError, Body, Param, Reply, Response, RouteTable

SILENCE_ID = re.compile(r"^[0-9a-f]{32}$")
KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$"
GROUP_FIELDS = ("service", "method", "severity", "app_name", "eco_type", "id")
MAX_MATCHERS = 20
MAX_GLOB = 200
MAX_SPAN = 365 * 86400.0  # seconds a silence may last
KEEP_EXPIRED = 7 * 86400.0  # seconds an expired silence is still listed
LATEST = 32503680000.0  # 3000-01-01: a time beyond this is a mistake, not a plan
PRUNE_BATCH = 500  # expired silences removed by one call

MatcherKey = Annotated[str, StringConstraints(pattern=KEY_PATTERN)]
Glob = Annotated[str, StringConstraints(min_length=1, max_length=MAX_GLOB)]


def _matchers_schema(schema: dict[str, Any]) -> None:
    # patternProperties has no OpenAPI 3.0 form (Swagger UI's document): the key pattern goes in words
    schema["additionalProperties"] = schema.pop("patternProperties").popitem()[1]


Matchers = Annotated[dict[MatcherKey, Glob], Field(
    min_length=1, max_length=MAX_MATCHERS, json_schema_extra=_matchers_schema,
    description="Field or label name (a letter or _, then up to 99 letters, digits, _ . or -) -> glob "
                "(`*`, `?`, `[...]`; case-sensitive). The fields are "
                "`service`, `method`, `severity`, `app_name`, `eco_type` and `id` (a group's id: "
                "exactly that group); any other name is a label. Every matcher must match.",
    examples=[{"service": "node!web*", "severity": "warning"}])]
Time = Annotated[float, Field(ge=0, le=LATEST, allow_inf_nan=False)]


# -- the models ------------------------------------------------------------------------

class Silence(BaseModel):
    """One silence, as it is stored and served; ``state`` follows from the clock."""

    id: str = Field(pattern=SILENCE_ID.pattern, description="32 hex digits, made when it is created.")
    matchers: Matchers
    starts: Time = Field(description="When it comes into force, in seconds since 1970.")
    ends: Time = Field(description="When it ends, in seconds since 1970.")
    comment: str = Field("", max_length=1000, description="Why: what the maintenance is.")
    created_by: str = Field("api", min_length=1, max_length=100, description="Who made it.")
    state: Literal["pending", "active", "expired"] = Field(
        description="`pending` before `starts`, `active` until `ends`, then `expired` (still listed for 7 days).")


class NewSilence(BaseModel):
    """What ``POST /api/silences`` takes: matchers, and either ``ends`` or ``duration``."""

    model_config = ConfigDict(extra="forbid")
    matchers: Matchers
    starts: Optional[Time] = Field(None, description="When it comes into force; now when left out.")
    ends: Optional[Time] = Field(None, description="When it ends, in seconds since 1970 (or give `duration`).")
    duration: Optional[float] = Field(None, gt=0, le=MAX_SPAN, allow_inf_nan=False,
                                      description="How long it lasts, in seconds from `starts` (or give `ends`).")
    comment: str = Field("", max_length=1000, description="Why: what the maintenance is.")
    created_by: str = Field("api", min_length=1, max_length=100, description="Who makes it.")

    @model_validator(mode="after")
    def _one_end(self) -> "NewSilence":
        if (self.ends is None) == (self.duration is None):
            raise ValueError("give either ends or duration (seconds), not both" if self.ends is not None
                             else "ends or duration: one of them is required")
        return self


class SilenceList(BaseModel):
    silences: list[Silence] = Field(description="Every silence, expired ones for 7 days after their end; "
                                                "the latest to start first.")


def describe(exc: ValidationError) -> str:
    """One sentence naming the field of the first fault of a NewSilence."""
    error = exc.errors()[0]
    loc, kind = error["loc"], error["type"]
    if kind == "json_invalid":
        return f"the body is not JSON: {error['msg'].removeprefix('Invalid JSON: ')}"
    if not loc:
        if kind == "value_error":
            return str(error.get("ctx", {}).get("error", error["msg"]))
        return "the body must be a JSON object with matchers, and ends or duration"
    name = str(loc[0])[:100]
    if name == "matchers" and len(loc) == 3:
        return (f"matchers: {str(loc[1])[:100]!r} is not a field or label name (a letter or _, then up to 99 "
                "letters, digits, _ . or -)")
    if name == "matchers" and len(loc) == 2:
        return f"matchers.{str(loc[1])[:100]}: a glob is text of 1 to {MAX_GLOB} characters"
    if name == "matchers" and kind in ("too_short", "too_long"):
        return f"matchers: give 1 to {MAX_MATCHERS} matchers"
    if kind == "extra_forbidden":
        return f"{name}: unknown field (give matchers, starts, ends or duration, comment, created_by)"
    if kind == "missing":
        return f"{name}: field required"
    return f"{name}: {error['msg']}"


def parse_new(raw: bytes, media_type: str = "", path: Optional[dict[str, str]] = None) -> NewSilence:
    """The POST body as a NewSilence, or ApiError 400 with a sentence naming the field."""
    try:
        return NewSilence.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(400, f"invalid silence: {describe(exc)}") from None


def create(new: NewSilence, now: float) -> dict[str, Any]:
    """The stored form of ``new`` made at ``now`` (no state); ValueError says which time is wrong."""
    starts = new.starts if new.starts is not None else now
    ends = new.ends if new.ends is not None else starts + (new.duration or 0.0)
    if ends <= starts:
        raise ValueError(f"ends: must be after starts ({starts!r}), got {ends!r}")
    if ends <= now:
        raise ValueError(f"ends: must be in the future (now is {now!r}), got {ends!r}")
    if ends > starts + MAX_SPAN:  # not ends - starts: a duration of MAX_SPAN must not round over it
        raise ValueError("ends: a silence lasts at most a year (31536000 s) after starts")
    if ends > LATEST:
        raise ValueError(f"ends: must be before the year 3000, got {ends!r}")
    return {"id": uuid.uuid4().hex, "matchers": dict(new.matchers), "starts": starts, "ends": ends,
            "comment": new.comment, "created_by": new.created_by}


def state(silence: dict[str, Any], now: float) -> str:
    """``pending`` before it starts, ``active`` until it ends, then ``expired``."""
    if now < silence["starts"]:
        return "pending"
    return "active" if now < silence["ends"] else "expired"


def present(silence: dict[str, Any], now: float) -> dict[str, Any]:
    """The served form: the stored one with its state at ``now``."""
    return {**silence, "state": state(silence, now)}


def expired_copy(silence: dict[str, Any], now: float) -> tuple[dict[str, Any], bool]:
    """``silence`` ended at ``now`` (unchanged when it ended already), and whether it never came into force.

    A pending silence expired starts and ends now: it never held anything back, so it is not claimed.
    """
    if silence["ends"] <= now:
        return silence, False
    pending = silence["starts"] > now
    return {**silence, "ends": now, "starts": now if pending else silence["starts"]}, pending


def newest_first(silences: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(silences, key=lambda s: (s["starts"], s["ends"], s["id"]), reverse=True)


def matches(matchers: dict[str, str], group: dict[str, Any]) -> bool:
    """All matchers match: a key is the group's field (service, method, severity, app_name, eco_type, id) or else
    one of group["labels"]; a missing field never matches (unless the glob is "*")."""
    labels = group.get("labels")
    for key, glob in matchers.items():
        if key in GROUP_FIELDS:
            value = group.get(key)
        else:
            value = labels.get(key) if isinstance(labels, dict) else None
        if value is None:
            if glob != "*":
                return False
        elif not fnmatch.fnmatchcase(value if isinstance(value, str) else str(value), glob):
            return False
    return True


# -- where they live -------------------------------------------------------------------

# what a store fires with for several silences; named out here, where a store's own ``list``
# does not hide the builtin
Silences = list[dict[str, Any]]


class SilenceStore:
    """Where silences live. Every call fires later (a Deferred); each is atomic against every other process.

    Every dict handed out is a :class:`Silence` with its state at the ``now`` given.
    """

    def __init__(self, clock: IReactorTime):
        self.clock = clock

    def add(self, new: NewSilence, now: float) -> Deferred[dict[str, Any]]:
        """Store ``new``; fires with it, or fails with ValueError when its times are wrong."""
        raise NotImplementedError

    def list(self, now: float) -> Deferred[Silences]:
        """Fires with every silence, the latest to start first; one expired more than 7 days ago is removed."""
        raise NotImplementedError

    def expire(self, silence_id: str, now: float) -> Deferred[Optional[dict[str, Any]]]:
        """End it now (unless it ended already); fires with it, or None when there is none."""
        raise NotImplementedError

    def active(self, now: float) -> Deferred[Silences]:
        """Fires with the silences in force at ``now``: ``starts <= now < ends``."""
        raise NotImplementedError

    def claim_ended(self, now: float) -> Deferred[Silences]:
        """Fires with the silences that ended at or before ``now`` and were not claimed before.

        Each is handed out once across every process. A silence expired before it started is never claimed.
        """
        raise NotImplementedError


# -- the REST face ---------------------------------------------------------------------

ID = {"id": Param("The silence's id (32 hex digits), as the list gives it",
                  {"type": "string", "pattern": SILENCE_ID.pattern})}
UNAVAILABLE = Response("The silences cannot be reached now (Redis unreachable); retry later")
EXAMPLE = {"matchers": {"service": "node!web*", "severity": "warning"}, "duration": 3600,
           "comment": "kernel upgrade on the web nodes", "created_by": "ops"}


class SilencesApi:
    """Serves ``/api/silences``: list, create and expire silences."""

    routes = RouteTable(tag="silences")

    def __init__(self, store: SilenceStore, clock: IReactorTime):
        self.store = store
        self.clock = clock

    @routes.get("/api/silences", summary="List the silences",
                description="Pending, active and expired ones (an expired one is listed for 7 days after its end), "
                            "the latest to start first.",
                responses={200: Response("The silences", SilenceList), 503: UNAVAILABLE})
    async def list_silences(self, request: Request) -> dict[str, Any]:
        return {"silences": await self.store.list(self.clock.seconds())}

    @routes.post("/api/silences", summary="Create a silence",
                 description="While it is in force, the groups it matches are still counted but send no notice; "
                             "when it ends, each matching group still open is notified once. Give `ends` or "
                             "`duration` (seconds); `starts` is now unless given. It lasts at most a year.",
                 body=Body(NewSilence, examples={"maintenance": EXAMPLE}, parse=parse_new),
                 responses={201: Response("The new silence", Silence), 503: UNAVAILABLE})
    async def create_silence(self, request: Request, body: NewSilence) -> Reply:
        try:
            silence = await self.store.add(body, self.clock.seconds())
        except ValueError as exc:
            raise ApiError(400, f"invalid silence: {exc}") from None
        return Reply(201, silence)

    @routes.delete("/api/silences/{id}", summary="Expire a silence",
                   description="It ends now and stays listed, expired, for 7 days. One that ended already "
                               "is answered as it is.",
                   params=ID,
                   responses={200: Response("The silence, now expired", Silence), 404: Response("No such silence"),
                              503: UNAVAILABLE})
    async def expire_silence(self, request: Request, id: str) -> dict[str, Any]:
        if not SILENCE_ID.match(id):
            raise ApiError(404, f"no silence {id[:80]!r}: an id is 32 hex digits")
        silence = await self.store.expire(id, self.clock.seconds())
        if silence is None:
            raise ApiError(404, f"no silence {id}")
        return silence
