"""A listening socket as a service that says where it listens, or exits with why it cannot."""
from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def check_endpoint(description: str) -> None:
    """Raise ValueError with a readable reason if ``description`` is no server endpoint string."""
    from twisted.internet.testing import MemoryReactor

    try:
        # serverFromString and MemoryReactor are Twisted's own, unannotated
        endpoints.serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{description!r} is not a Twisted server endpoint string "
                         f"such as tcp:8080:interface=127.0.0.1 ({exc})") from None


class Listener(Service):
    """Listens in ``privilegedStartService``, so a port below 1024 can be bound before privileges drop."""

    def __init__(self, what: str, description: str, factory: Any, reactor: Any,
                 scheme: Optional[str] = None, on_listen: Optional[Callable[[IListeningPort], None]] = None):
        self.what = what
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.scheme = scheme
        self.on_listen = on_listen
        self.port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self._listen()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        endpoint = endpoints.serverFromString(self.reactor, self.description)  # type: ignore[no-untyped-call]
        outcome: list[Any] = []
        endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            reason = outcome[0].getErrorMessage() if outcome else "the endpoint did not listen at once"
            # a clear line and a non-zero exit, not a traceback
            raise SystemExit(f"cockpit: cannot listen for the {self.what} on {self.description}: {reason}")
        self.port = outcome[0]
        address: Any = self.port.getHost()  # IAddress names no host nor port; the IP addresses have both
        host = getattr(address, "host", None)
        where = f"{host}:{address.port}" if host is not None else str(address)
        if self.scheme:
            where = f"{self.scheme}://{where}/"
        log.info("{what} on {where}", what=self.what, where=where)
        if self.on_listen is not None:
            self.on_listen(self.port)

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
