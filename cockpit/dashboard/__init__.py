"""The dashboard at ``/``: a page, its script and its style, served from this package.

The files (``index.html``, ``app.js``, ``app.css``) are read once and served with a strict
Content-Security-Policy: no inline script or style, nothing from another origin.

EventSource cannot send an Authorization header and a token must never be in a URL, so
``POST /api/events/live/session`` (authenticated) sets a short-lived HttpOnly cookie holding
a random ticket; ``GET /api/events/live`` takes that cookie instead of the Bearer header.
Tickets live in this process only: a browser opens its stream on the process that gave it one.
"""
from __future__ import annotations

import functools
import secrets
from collections import OrderedDict
from importlib import resources
from typing import Optional

from pydantic import BaseModel, Field
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from cockpit.openapi import ApiError, Param, Reply, Response, RouteTable

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
HEADERS = {
    b"Content-Security-Policy": PAGE_CSP.encode(),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}
# the files a browser may fetch, by name; anything else is a 404, and there is no listing
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

LIVE_PATH = "/api/events/live"
TICKET_COOKIE = b"cockpit_live"
TICKET_LIFETIME = 60.0  # seconds a ticket may open (or reopen) a stream
MAX_TICKETS = 4096  # tickets held at once; past this the oldest goes


@functools.lru_cache(maxsize=None)
def asset(name: str) -> bytes:
    """The bytes of one of the dashboard's files (read once)."""
    return resources.files(__name__).joinpath(name).read_bytes()


class LiveTickets:
    """Random tickets that each open the live event stream for ``lifetime`` seconds.

    Bounded: at most ``limit`` are held, and issuing one past that forgets the oldest.
    """

    def __init__(self, clock: IReactorTime, lifetime: float = TICKET_LIFETIME, limit: int = MAX_TICKETS):
        self.clock = clock
        self.lifetime = lifetime
        self.limit = limit
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # oldest first

    def issue(self) -> bytes:
        now = self.clock.seconds()
        self._prune(now)
        while len(self._expiry) >= self.limit:
            self._expiry.popitem(last=False)
        ticket = secrets.token_urlsafe(32).encode("ascii")
        self._expiry[ticket] = now + self.lifetime
        return ticket

    def valid(self, ticket: Optional[bytes]) -> bool:
        """True when ``ticket`` was issued here and has not expired (a dict lookup: no timing to learn from)."""
        if not ticket or len(ticket) > 64:
            return False
        expiry = self._expiry.get(ticket)
        if expiry is None:
            return False
        if expiry <= self.clock.seconds():
            del self._expiry[ticket]
            return False
        return True

    def admits(self, request: Request) -> bool:
        """True when ``request`` is for the live stream and carries a valid ticket cookie."""
        return request.path == LIVE_PATH.encode() and self.valid(request.getCookie(TICKET_COOKIE))

    def _prune(self, now: float) -> None:
        # issued in order with one lifetime: the expired ones are at the front
        while self._expiry:
            ticket, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            del self._expiry[ticket]


class LiveSession(BaseModel):
    expires_in: float = Field(description="Seconds the ticket cookie may open the live stream for; "
                                          "ask for a new one after that.")


def _serve(request: Request, name: str) -> bytes:
    content_type = ASSETS.get(name)
    if content_type is None:
        raise ApiError(404, f"no such file: /static/{name[:80]}")
    request.setHeader(b"Content-Type", content_type.encode())
    for header, value in HEADERS.items():
        request.setHeader(header, value)
    return asset(name)


class Dashboard:
    """Serves the page, its files, and the ticket that opens the live stream from a browser."""

    routes = RouteTable(tag="dashboard")

    def __init__(self, tickets: LiveTickets):
        self.tickets = tickets

    @routes.get("/", summary="The dashboard", auth=False, raw=True,
                description="The operator's page: live events, services and runs, error conditions and "
                            "alarms, silences, heartbeats and health. It asks for a token when the API needs one.",
                responses={200: Response("The dashboard page", {"type": "string"}, "text/html")})
    def page(self, request: Request) -> bytes:
        return _serve(request, "index.html")

    @routes.get("/static/{name}", summary="The dashboard's script and style", auth=False, raw=True, hidden=True,
                params={"name": Param("app.js or app.css")})
    def static(self, request: Request, name: str) -> bytes:
        return _serve(request, name if name != "index.html" else "")

    @routes.post(LIVE_PATH + "/session", summary="A ticket that opens the live stream from a browser",
                 description="Sets an HttpOnly, SameSite=Strict cookie, scoped to `" + LIVE_PATH + "`, holding a "
                             "random ticket: for the next minute `GET " + LIVE_PATH + "` takes it in place of "
                             "the Bearer token (EventSource cannot send headers, and a token never goes in a "
                             "URL). Tickets are kept by the process that made them.",
                 responses={200: Response("The cookie is set", LiveSession)})
    def live_session(self, request: Request) -> Reply:
        ticket = self.tickets.issue()
        request.addCookie(TICKET_COOKIE, ticket, path=LIVE_PATH.encode(), max_age=str(int(self.tickets.lifetime)),
                          httpOnly=True, sameSite="strict", secure=request.isSecure() or None)
        request.setHeader(b"Cache-Control", b"no-store")
        return Reply(200, {"expires_in": self.tickets.lifetime})


__all__ = ["Dashboard", "LiveTickets", "PAGE_CSP", "asset"]
