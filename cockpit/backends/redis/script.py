"""Lua scripts run by their sha1: every atomic change the Redis backend makes is one of these."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence, Union

import txredisapi
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from cockpit.backends.redis.bus import RedisBus


class Script:
    """A Lua script run with EVALSHA, sent whole (EVAL) only when Redis does not know it yet:
    after a restart, a ``SCRIPT FLUSH`` or a failover. EVALSHA spares sending and hashing it each time."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, bus: RedisBus, *args: Any, keys: Sequence[str] = ()) -> Deferred[Any]:
        d = bus.execute("EVALSHA", self.sha, str(len(keys)), *keys, *args)

        def unknown(failure: Failure) -> Union[Failure, Deferred[Any]]:
            failure.trap(txredisapi.ResponseError)
            if "NOSCRIPT" not in str(failure.value):
                return failure
            return bus.execute("EVAL", self.source, str(len(keys)), *keys, *args)

        return d.addErrback(unknown)
