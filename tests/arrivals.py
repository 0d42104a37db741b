"""Waiting on a Deferred, not a poll, for what tests collect."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred


class Arrivals(list):
    """A list that says, by a Deferred, when it holds a given number of items."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[int, Deferred]] = []

    def append(self, item) -> None:
        super().append(item)
        for entry in [e for e in self._waiting if e[0] <= len(self)]:
            self._waiting.remove(entry)
            entry[1].callback(self)

    def when(self, count: int) -> Deferred:
        if len(self) >= count:
            return defer.succeed(self)
        d: Deferred = Deferred()
        self._waiting.append((count, d))
        return d
