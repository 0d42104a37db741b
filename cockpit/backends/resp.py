"""The Redis wire: commands encoded in RESP, and replies parsed by hiredis in C.

The one place that knows txredisapi below its public API (its protocol classes, the
reply queue they fill); the rest of the backend talks through :class:`RedisBus`.
"""
from __future__ import annotations

from typing import Any, Callable, Generator, Optional, Sequence

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()

# error replies that a Redis still starting (or too busy) gives: worth another connection
_PASSING_ERRORS = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "ERR max number of clients")


class Handshake:
    """AUTH and SELECT on each new connection; only a refusal by Redis stops the reconnecting.

    txredisapi's own handshake stops reconnecting for good whatever goes wrong, a connection
    that a restarting Redis drops in the middle of AUTH or SELECT included. Mixed in before a
    txredisapi protocol class, whose factory carries ``redacted_url``.
    """

    # the protocol class's, which is untyped
    factory: Any
    transport: Any
    password: Optional[str]
    username: Optional[str]
    dbid: Optional[int]
    connected: int
    _ready: bool
    _waiting_for_connect: list[Deferred[Any]]
    auth: Callable[..., Deferred[Any]]
    select: Callable[..., Deferred[Any]]

    @defer.inlineCallbacks
    def connectionMade(self) -> Generator[Deferred[Any], Any, None]:
        step = "AUTH"
        try:
            if self.password is not None:
                yield self.auth(self.password, self.username)
            if self.dbid is not None:
                step = "SELECT"
                yield self.select(self.dbid)
        except txredisapi.ResponseError as exc:
            if str(exc).startswith(_PASSING_ERRORS):
                self._handshake_failed(step, exc, final=False)
            else:
                self._handshake_failed(step, exc, final=True)
            return
        except Exception as exc:  # the connection went away under the handshake
            self._handshake_failed(step, exc, final=False)
            return
        self.connected = 1
        self._ready = True
        waiting, self._waiting_for_connect = self._waiting_for_connect, []
        for d in waiting:
            d.callback(self)

    def _handshake_failed(self, step: str, error: Exception, final: bool) -> None:
        url = getattr(self.factory, "redacted_url", "Redis")
        if final:
            # a wrong password or a database that does not exist: no new connection changes that
            log.error("Redis at {url} refused {step}: {error}; not reconnecting: fix [redis] url and restart",
                      url=url, step=step, error=error)
            self.factory.stopTrying()
            self.factory.connectionError(f"Redis refused {step}: {error}")
        else:
            log.warn("Redis at {url}: the connection failed during {step} ({error}); reconnecting",
                     url=url, step=step, error=error)
        self.transport.loseConnection()


def fields(flat: Optional[list[str]]) -> dict[str, str]:
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2]))


def encode_command(args: Sequence[Any]) -> bytes:
    """One command in the Redis protocol (RESP)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif not isinstance(arg, (bytes, bytearray)):
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


if txredisapi.hiredis is not None:
    class CommandProtocol(Handshake, txredisapi.HiredisProtocol):  # type: ignore[misc]  # txredisapi is unannotated
        """Replies parsed and decoded by hiredis in C, handed on as they are.

        txredisapi's own transaction bookkeeping and per-element conversion are skipped:
        this bus never uses txredisapi's multi(), and convertNumbers is off anyway.
        """

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._reader = txredisapi.hiredis.Reader(
                protocolError=txredisapi.InvalidData, replyError=txredisapi.ResponseError,
                encoding="utf-8", errors="replace")

        def dataReceived(self, data: bytes, unpause: bool = False) -> None:
            if data:
                self._reader.feed(data)
            gets, deliver = self._reader.gets, self.replyReceived
            reply = gets()
            while reply is not False:
                deliver(reply)
                reply = gets()
else:  # pragma: no cover - hiredis is a dependency; this keeps a broken install working
    # txredisapi is unannotated
    class CommandProtocol(Handshake, txredisapi.RedisProtocol):  # type: ignore[no-redef,misc]
        pass


MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"
