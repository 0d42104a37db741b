"""The REST face of the event groups (docs/design.md §5, §10): lists, one group, and its lifecycle."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from twisted.web.server import Request

from cockpit.groups import (GROUP_ID, AlarmGroupDetail, AlarmGroupList, EcoGroupDetail, EcoGroupList, EventGroups,
                            GroupStore)
from cockpit.openapi import ApiError, Body, Param, Response, RouteTable


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(50, ge=1, le=1000, description="At most this many.")
    before: Optional[str] = Field(None, pattern=r"^[0-9]{1,19}:[0-9a-f]{1,64}$",
                                  description="Paging: the `next` of the previous page.")


class EcoQuery(_Query):
    state: Optional[Literal["NEW", "ALERT", "CLOSED"]] = Field(None, description="Only groups in this state.")
    sort: Literal["last_time", "occurence", "count"] = Field(
        "last_time", description="Latest first (last_time), or most frequent first (occurence; count is the same).")


class AlarmQuery(_Query):
    state: Optional[Literal["firing", "resolved", "closed"]] = Field(None, description="Only groups in this state.")
    sort: Literal["last_time", "count"] = Field(
        "last_time", description="Latest first (last_time), or most frequent first (count).")


class Actor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: str = Field("api", min_length=1, max_length=100, description="Who does it, as the group will record it.")


ID = {"id": Param("The group's id (32 hex digits), as the list gives it",
                  {"type": "string", "pattern": "^[0-9a-f]{32}$"})}
KIND = {"ecos": "eco", "alarms": "alarm"}


class GroupsApi:
    """Serves ``/api/ecos`` and ``/api/alarms``; ``groups`` None answers 503 (a cockpit without groups)."""

    routes = RouteTable(tag="groups")

    def __init__(self, groups: Optional[EventGroups]):
        self.groups = groups

    def _store(self) -> GroupStore:
        if self.groups is None:
            raise ApiError(503, "this cockpit does not keep event groups")
        return self.groups.store

    async def _page(self, kind: str, query: Union[EcoQuery, AlarmQuery]) -> dict[str, Any]:
        try:
            found, after = await self._store().page(KIND[kind], query.limit, query.before, query.state, query.sort)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return {kind: found, "next": after}

    async def _one(self, kind: str, id: str, action: Optional[str] = None, by: str = "api") -> dict[str, Any]:
        store = self._store()
        if not GROUP_ID.match(id):
            raise ApiError(404, f"no {KIND[kind]} group {id[:80]!r}: an id is 32 hex digits")
        group = await (store.get(KIND[kind], id) if action is None else store.act(KIND[kind], id, action, by))
        if group is None:
            raise ApiError(404, f"no {KIND[kind]} group {id}")
        return group

    @routes.get("/api/ecos", summary="Error conditions grouped by fingerprint", query=EcoQuery,
                description="Most recent first, or most frequent first with `sort=occurence`. "
                            "`state` keeps the groups in one state.",
                responses={200: Response("The eco groups", EcoGroupList),
                           503: Response("The groups cannot be read now")})
    async def ecos(self, request: Request, query: EcoQuery) -> dict[str, Any]:
        return await self._page("ecos", query)

    @routes.get("/api/alarms", summary="Alarms grouped by fingerprint, or by service, method and message",
                description="Most recent first, or most frequent first with `sort=count`. "
                            "`state` keeps the groups in one state.",
                query=AlarmQuery,
                responses={200: Response("The alarm groups", AlarmGroupList),
                           503: Response("The groups cannot be read now")})
    async def alarms(self, request: Request, query: AlarmQuery) -> dict[str, Any]:
        return await self._page("alarms", query)

    @routes.get("/api/ecos/{id}", summary="One error condition, with its latest occurrences", params=ID,
                responses={200: Response("The group", EcoGroupDetail), 404: Response("No such group")})
    async def eco(self, request: Request, id: str) -> dict[str, Any]:
        return await self._one("ecos", id)

    @routes.get("/api/alarms/{id}", summary="One alarm group, with its latest occurrences", params=ID,
                responses={200: Response("The group", AlarmGroupDetail), 404: Response("No such group")})
    async def alarm(self, request: Request, id: str) -> dict[str, Any]:
        return await self._one("alarms", id)

    @routes.post("/api/ecos/{id}/{action}", summary="Ack, close or reopen an error condition",
                 description="`ack` records who and when (and stops repeat notices); `close` ends it, and a "
                             "newer occurrence opens it again; `reopen` opens it now. Each answers the group.",
                 params={**ID, "action": Param("What to do", {"type": "string", "enum": ["ack", "close", "reopen"]})},
                 body=Body(Actor, required=False),
                 responses={200: Response("The group, as it is now", EcoGroupDetail),
                            404: Response("No such group or action")})
    async def eco_action(self, request: Request, id: str, action: str, body: Optional[Actor] = None) -> Any:
        return await self._act("ecos", id, action, body)

    @routes.post("/api/alarms/{id}/{action}", summary="Ack, close or reopen an alarm group",
                 description="`ack` records who and when (and stops repeat notices); `close` ends it by hand "
                             "(a newer firing opens it again); `reopen` opens it now. Each answers the group.",
                 params={**ID, "action": Param("What to do", {"type": "string", "enum": ["ack", "close", "reopen"]})},
                 body=Body(Actor, required=False),
                 responses={200: Response("The group, as it is now", AlarmGroupDetail),
                            404: Response("No such group or action")})
    async def alarm_action(self, request: Request, id: str, action: str, body: Optional[Actor] = None) -> Any:
        return await self._act("alarms", id, action, body)

    async def _act(self, kind: str, id: str, action: str, body: Optional[Actor]) -> dict[str, Any]:
        if action not in ("ack", "close", "reopen"):
            raise ApiError(404, f"no action {action[:40]!r} on a group: use ack, close or reopen")
        return await self._one(kind, id, action, body.by if body is not None else "api")

