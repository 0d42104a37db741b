"""The dashboard at ``/``: a page, its script and its style, served from this package.

The files (``index.html``, ``app.js``, ``app.css``) are read once and served with a strict
Content-Security-Policy: no inline script or style, nothing from another origin.

EventSource cannot send an Authorization header and a token must never be in a URL, so
``POST /api/events/live/session`` (authenticated) sets a short-lived HttpOnly cookie holding
a random ticket; ``GET /api/events/live`` takes that cookie instead of the Bearer header.
Tickets live in this process only: a browser opens its stream on the process that gave it one.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from importlib import resources
from typing import Optional, Sequence

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
MAX_TICKET = 160  # bytes: a longer cookie is no ticket of ours


@functools.lru_cache(maxsize=None)
def asset(name: str) -> bytes:
    """The bytes of one of the dashboard's files (read once)."""
    return resources.files(__name__).joinpath(name).read_bytes()


class LiveTickets:
    """Tickets that each open the live event stream for ``lifetime`` seconds, checked by any cockpit.

    A ticket is ``<expiry in ms>.<nonce>.<HMAC-SHA256 of both>``, keyed by the ``[api] tokens``: every
    cockpit process that takes the same tokens accepts it, behind a load balancer too, and none
    keeps anything (a ticket kept in one process's memory would be refused by the next one the
    browser's reconnect reaches). Changing the tokens ends the tickets made with the old ones.
    """

    def __init__(self, clock: IReactorTime, tokens: Sequence[bytes] = (), lifetime: float = TICKET_LIFETIME):
        self.clock = clock
        self.lifetime = lifetime
        self._key = hashlib.sha256(b"cockpit live ticket\0" + b"\0".join(sorted(tokens))).digest()

    def _sign(self, payload: bytes) -> bytes:
        return base64.urlsafe_b64encode(hmac.new(self._key, payload, hashlib.sha256).digest()).rstrip(b"=")

    def issue(self) -> bytes:
        expiry = round((self.clock.seconds() + self.lifetime) * 1000)  # in milliseconds
        payload = b"%d.%s" % (expiry, secrets.token_urlsafe(16).encode("ascii"))
        return payload + b"." + self._sign(payload)

    def valid(self, ticket: Optional[bytes]) -> bool:
        """True when ``ticket`` was signed with these tokens and has not expired (compared in constant time)."""
        if not ticket or len(ticket) > MAX_TICKET:
            return False
        payload, _, signature = ticket.rpartition(b".")
        expiry = payload.partition(b".")[0]
        if not expiry.isdigit() or not hmac.compare_digest(signature, self._sign(payload)):
            return False
        return int(expiry) > self.clock.seconds() * 1000

    def admits(self, request: Request) -> bool:
        """True when ``request`` is for the live stream and carries a valid ticket cookie."""
        return request.path == LIVE_PATH.encode() and self.valid(request.getCookie(TICKET_COOKIE))


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
