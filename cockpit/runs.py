"""Action runs, and the run history: the interface both backends implement.

A run is recorded once, when it has completed. ``(event_guid, repo, service, action)``
is unique among the runs of events: the record of a redelivered event's run is refused,
and :meth:`RunHistory.completed` tells the robot what not to run again. A run still going
can be shown as ``running`` (:meth:`RunHistory.started`) until its record replaces it.

:class:`cockpit.backends.embedded.runs.SqliteRunHistory` keeps one process's runs in
SQLite under its data dir; :class:`cockpit.backends.redis.runs.RedisRunHistory` keeps
those of every process on one Redis. ``Backend.run_history()`` hands out the right one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, List, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred

STATES = ("new", "running", "ok", "error", "timeout")
DONE_STATES = ("ok", "error", "timeout")
TRIGGER_KINDS = ("event", "rest", "telegram", "recurring", "blueprint")
FILTERS = ("repo", "service", "action", "state", "event_guid")

_sequence = 0


def new_run_id(now: float) -> str:
    """Sortable by creation time ``now`` (microseconds, hex), unique across processes."""
    global _sequence
    _sequence = (_sequence + 1) & 0xFFF
    return f"{int(now * 1_000_000):014x}{_sequence:03x}{os.urandom(3).hex()}"


def id_bound(when: float) -> str:
    """The prefix every id made before ``when`` sorts below."""
    return f"{max(int(when * 1_000_000), 0):014x}"


@dataclass
class Run:
    """One run of one action (docs/design.md §5 "A run looks like")."""

    repo: str
    service: Optional[str]  # role!instance; None for what the robot does itself (repo.create, ...)
    action: str
    trigger: dict[str, Any]  # {kind, event_type, event_guid}
    id: str  # new_run_id(clock.seconds())
    state: str = "new"
    started: Optional[float] = None
    ended: Optional[float] = None
    log: str = ""
    result: Any = None

    @property
    def event_guid(self) -> Optional[str]:
        return self.trigger.get("event_guid")

    @property
    def once_key(self) -> tuple[str, str, str]:
        """What must not complete twice for one event; "" stands for the robot's own service."""
        return (self.repo, self.service or "", self.action)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "repo": self.repo, "service": self.service, "action": self.action,
                "state": self.state, "trigger": dict(self.trigger), "started": self.started,
                "ended": self.ended, "log": self.log, "result": self.result}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Run":
        return cls(data["repo"], data.get("service"), data["action"], dict(data.get("trigger") or {}),
                   data["id"], data.get("state", "new"), data.get("started"), data.get("ended"),
                   data.get("log", ""), data.get("result"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


def check_filters(filters: dict[str, Optional[str]]) -> dict[str, str]:
    """The filters that are set; ValueError for a name that is none of FILTERS."""
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise ValueError(f"runs cannot be filtered by {', '.join(sorted(unknown))}; by {', '.join(FILTERS)} only")
    return {name: str(value) for name, value in filters.items() if value is not None}


class RunHistory(MultiService):
    """Where runs are recorded; a service that the robot starts and stops (see the module docstring)."""

    def record(self, run: Run) -> Deferred[bool]:
        """Store a completed run; fires True once stored, False if refused.

        Refused: a run with the same id is recorded, or (a run with an event guid) one of the same
        ``(event_guid, repo, service, action)``, by whichever process.
        """
        raise NotImplementedError

    def started(self, run: Run) -> Deferred[None]:
        """``run`` started: show it as running (once it has gone on a moment) until it is recorded or its
        process is gone; never fails.

        Only where other processes read the history: one process knows its own runs.
        """
        return defer.succeed(None)

    def completed(self, event_guid: str) -> Deferred[set[tuple[str, str, str]]]:
        """Fires with the set of ``Run.once_key`` already recorded for ``event_guid``."""
        raise NotImplementedError

    def get(self, run_id: str) -> Deferred[Optional[Run]]:
        """Fires with the Run (recorded, or shown running), or None."""
        raise NotImplementedError

    def list(self, limit: int = 50, before: Optional[str] = None,
             **filters: Optional[str]) -> Deferred[List[Run]]:
        """Fires with up to ``limit`` runs with ids below ``before``, newest first, those shown running included.

        Filters (None for any): repo, service, action, state, event_guid.
        """
        raise NotImplementedError

    def count(self, **filters: Optional[str]) -> Deferred[int]:
        """Fires with the number of recorded runs that match ``filters`` (those of :meth:`list`)."""
        raise NotImplementedError

    def prune(self, now: Optional[float] = None) -> Deferred[int]:
        """Drop runs made more than keep_days before ``now`` (the history's clock by default), then all
        but the newest keep_runs, each with its completion mark; fires with how many went."""
        raise NotImplementedError
