"""What the Redis backend uses of txredisapi beyond its public calls, in one place.

txredisapi 1.6 (pinned in setup.py) has no public way to list a factory's connections or to
wait for a reply written straight to the transport (a pipelined MULTI/EXEC, one write for
many commands). These two helpers are the only places that reach inside it;
``tests/test_compat.py`` fails, naming the attribute, if an upgrade moves either.
"""
from __future__ import annotations

from typing import Any


def connections(factory: Any) -> list[Any]:
    """The connections a txredisapi factory holds, connected or not (``factory.pool``)."""
    return list(factory.pool) if factory is not None else []


def reply_queue(protocol: Any) -> Any:
    """The queue a txredisapi connection hands its replies to, in order (``protocol.replyQueue``)."""
    return protocol.replyQueue
