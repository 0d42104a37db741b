"""Silences in this process's memory (the embedded backend)."""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cockpit.silences import (KEEP_EXPIRED, NewSilence, Silences, SilenceStore, create, expired_copy,
                              newest_first, present)


class MemorySilenceStore(SilenceStore):
    def __init__(self, clock: IReactorTime):
        super().__init__(clock)
        self.silences: dict[str, dict[str, Any]] = {}  # id -> the stored form
        self.unclaimed: set[str] = set()  # ids whose end nobody has claimed yet

    def add(self, new: NewSilence, now: float) -> Deferred[dict[str, Any]]:
        try:
            silence = create(new, now)
        except ValueError as exc:
            return defer.fail(exc)
        self.silences[silence["id"]] = silence
        self.unclaimed.add(silence["id"])
        return defer.succeed(present(silence, now))

    def _prune(self, now: float) -> None:
        for old in [i for i, s in self.silences.items() if s["ends"] < now - KEEP_EXPIRED]:
            del self.silences[old]
            self.unclaimed.discard(old)

    def list(self, now: float) -> Deferred[Silences]:
        self._prune(now)
        return defer.succeed([present(s, now) for s in newest_first(list(self.silences.values()))])

    def expire(self, silence_id: str, now: float) -> Deferred[Optional[dict[str, Any]]]:
        silence = self.silences.get(silence_id)
        if silence is None:
            return defer.succeed(None)
        silence, never_started = expired_copy(silence, now)
        self.silences[silence_id] = silence
        if never_started:
            self.unclaimed.discard(silence_id)
        return defer.succeed(present(silence, now))

    def active(self, now: float) -> Deferred[Silences]:
        return defer.succeed([present(s, now) for s in self.silences.values() if s["starts"] <= now < s["ends"]])

    def claim_ended(self, now: float) -> Deferred[Silences]:
        ended = sorted((s for i, s in self.silences.items() if i in self.unclaimed and s["ends"] <= now),
                       key=lambda s: s["ends"])
        self.unclaimed.difference_update(s["id"] for s in ended)
        self._prune(now)
        return defer.succeed([present(s, now) for s in ended])
