"""The one Klein site: REST API under /api, the store under /store, the dashboard at /."""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

from klein import Klein
from twisted.logger import Logger
from twisted.web.server import Request, Site

from cockpit.bus import Bus
from cockpit.config import Config

log = Logger()


def json_body(request: Request, payload: Any, status: int = 200) -> bytes:
    """Klein answers an empty 200 for a dict: always hand it bytes with a Content-Type."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(payload, ensure_ascii=False).encode()


def json_error(request: Request, status: int, message: str) -> bytes:
    return json_body(request, {"error": message}, status)


class Api:
    """The web application; given its dependencies, so a test can build one around fakes."""

    app = Klein()

    def __init__(self, config: Config, bus: Bus,
                 services: Optional[dict[str, Callable[[], dict[str, Any]]]] = None):
        self.config = config
        self.bus = bus
        # name -> a callable reporting that part's state, for /api/health
        self.services = services if services is not None else {}

    @app.route("/api/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        bus = self.bus.health()
        parts = {name: report() for name, report in self.services.items()}
        ok = bus["ok"] and all(part.get("ok", True) for part in parts.values())
        return json_body(request, {"status": "ok" if ok else "degraded", "bus": bus, "services": parts},
                         200 if ok else 503)

    @app.handle_errors
    def unexpected(self, request: Request, failure: Any) -> bytes:
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            exc = failure.value
            return json_error(request, exc.code or 500, exc.description or exc.name)
        log.failure("unhandled error on {method} {path}", failure,
                    method=request.method.decode(), path=request.path.decode(errors="replace"))
        return json_error(request, 500, "internal error; the cockpit's log has the details")

    def site(self) -> Site:
        site = Site(self.app.resource())
        site.displayTracebacks = False
        return site
