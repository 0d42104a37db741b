"""The Redis wire: commands encoded in RESP, and replies parsed by hiredis in C.

The one place that knows txredisapi below its public API (its protocol classes, the
reply queue they fill); the rest of the backend talks through :class:`RedisBus`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import txredisapi

def fields(flat: Optional[list]) -> dict[str, str]:
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
    class CommandProtocol(txredisapi.HiredisProtocol):
        """Replies parsed and decoded by hiredis in C, handed on as they are.

        txredisapi's own transaction bookkeeping and per-element conversion are skipped:
        this bus never uses txredisapi's multi(), and convertNumbers is off anyway.
        """

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._reader = txredisapi.hiredis.Reader(
                protocolError=txredisapi.InvalidData, replyError=txredisapi.ResponseError,
                encoding="utf-8", errors="replace")

        def dataReceived(self, data, unpause=False):
            if data:
                self._reader.feed(data)
            gets, deliver = self._reader.gets, self.replyReceived
            reply = gets()
            while reply is not False:
                deliver(reply)
                reply = gets()
else:  # pragma: no cover - hiredis is a dependency; this keeps a broken install working
    CommandProtocol = txredisapi.RedisProtocol


MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"
