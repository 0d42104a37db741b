"""The run history of one process: the table ``runs`` of ``<data_dir>/runs.sqlite``, through
``twisted.enterprise.adbapi`` (see :mod:`cockpit.runs`).

Writes are grouped: whatever is recorded while one transaction is being committed goes
into the next one, so a busy robot pays one commit for many runs. A unique index on
``(event_guid, repo, service, action)`` refuses a second run of one event's action.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Generator, List, Optional

from twisted.application.internet import TimerService
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit.runs import Run, RunHistory, check_filters, id_bound

log = Logger()

_COLUMNS = ("id", "repo", "service", "action", "trigger_kind", "event_type", "event_guid", "state",
            "started", "ended", "log", "result")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY,
        repo TEXT NOT NULL,
        service TEXT,
        action TEXT NOT NULL,
        trigger_kind TEXT NOT NULL,
        event_type TEXT,
        event_guid TEXT,
        state TEXT NOT NULL,
        started REAL,
        ended REAL,
        log TEXT NOT NULL DEFAULT '',
        result TEXT)""",
    # a redelivered event must not leave a second record of the same run
    """CREATE UNIQUE INDEX IF NOT EXISTS runs_event_once
        ON runs (event_guid, repo, service, action) WHERE event_guid IS NOT NULL""",
    # runs are pruned by id (their creation time) now, which the primary key orders
    "DROP INDEX IF EXISTS runs_ended",
]


def _row(run: Run) -> tuple[Any, ...]:
    result = None if run.result is None else json.dumps(run.result, default=str)
    # "" for the robot's own runs: SQLite's unique index would let NULLs repeat
    return (run.id, run.repo, run.service or "", run.action, run.trigger.get("kind", "rest"),
            run.trigger.get("event_type"), run.event_guid, run.state, run.started, run.ended, run.log, result)


def _from_row(row: tuple[Any, ...]) -> Run:
    values = dict(zip(_COLUMNS, row))
    result = values["result"]
    return Run(values["repo"], values["service"] or None, values["action"],
               {"kind": values["trigger_kind"], "event_type": values["event_type"],
                "event_guid": values["event_guid"]},
               values["id"], values["state"], values["started"], values["ended"], values["log"],
               json.loads(result) if result is not None else None)


def _where(filters: dict[str, Optional[str]]) -> tuple[list[str], list[str]]:
    chosen = check_filters(filters)
    return [f"{name} = ?" for name in chosen], list(chosen.values())


def _open(connection: sqlite3.Connection) -> None:
    # WAL: readers do not wait for the writer; NORMAL: a committed run survives the process dying
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=5000")


class SqliteRunHistory(RunHistory):
    """The runs table at ``path``; a service that opens it, prunes it and closes it."""

    def __init__(self, path: Path, clock: IReactorTime, keep_days: float = 30.0, keep_runs: int = 100000,
                 prune_interval: float = 3600.0):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.path = Path(path)
        self.keep_days = keep_days
        self.keep_runs = keep_runs
        self.clock = clock
        self.pool: Optional[adbapi.ConnectionPool] = None
        self._ready = False
        self._open_error: Any = None
        self._waiters: list[Deferred[None]] = []
        # (run, d): d fires True or False once the run is written, or None once all before it is (run None)
        self._batch: list[tuple[Optional[Run], Deferred[Any]]] = []
        self._writing = False
        # TimerService is Twisted's own, unannotated
        pruner = TimerService(prune_interval, self._prune_logged)  # type: ignore[no-untyped-call]
        pruner.clock = clock
        pruner.setServiceParent(self)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # adbapi's pool and MultiService are Twisted's own, unannotated
        self.pool = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
            "sqlite3", str(self.path), check_same_thread=False, cp_min=1, cp_max=1, cp_openfun=_open)
        self.pool.runInteraction(self._create).addCallbacks(  # type: ignore[no-untyped-call]
            self._opened, self._open_failed)
        super().startService()  # type: ignore[no-untyped-call]

    @staticmethod
    def _create(cursor: Any) -> None:
        for statement in _SCHEMA:
            cursor.execute(statement)

    @defer.inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        yield super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        while self._writing or self._batch:
            yield self._flushed()
        if self.pool is not None:
            self.pool.close()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
            self.pool = None
        self._ready = False

    def _flushed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._batch.append((None, d))
        self._kick()
        return d

    def _opened(self, _: Any) -> None:
        self._ready = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _open_failed(self, failure: Any) -> None:
        log.failure("cannot open the run history {path}", failure, path=str(self.path))
        self._open_error = failure
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(failure)

    def _when_ready(self) -> Deferred[None]:
        if self._ready:
            return defer.succeed(None)
        if self._open_error is not None:
            return defer.fail(self._open_error)
        if self.pool is None:
            return defer.fail(RuntimeError("the run history is not started"))
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    # Any: Twisted leaves adbapi unannotated, and the pool is called in callbacks' lambdas, where an untyped
    # call fails every overload of addCallback, ignored or not
    def _open_pool(self) -> Any:
        """The pool, once `_when_ready` has fired (which needs it open)."""
        assert self.pool is not None, "the run history is not started"
        return self.pool

    # -- writing -----------------------------------------------------------
    def record(self, run: Run) -> Deferred[bool]:
        if self.pool is None:  # never started, or stopped: nothing would ever write it
            return defer.fail(RuntimeError(f"the run history {self.path} is not running; run {run.id} is not recorded"))
        d: Deferred[bool] = Deferred()
        self._batch.append((run, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._writing or not self._batch or self.pool is None:
            return
        batch, self._batch = self._batch, []
        self._writing = True
        d = self._when_ready()
        d.addCallback(lambda _: self._open_pool().runInteraction(self._insert, [run for run, _ in batch if run]))
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(batch,), errbackArgs=(batch,))

    @staticmethod
    def _insert(cursor: Any, runs: list[Run]) -> list[bool]:
        placeholders = ", ".join("?" * len(_COLUMNS))
        inserted = []
        for run in runs:
            cursor.execute(f"INSERT OR IGNORE INTO runs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", _row(run))
            inserted.append(cursor.rowcount == 1)
        return inserted

    def _written(self, inserted: list[bool], batch: list[tuple[Optional[Run], Deferred[Any]]]) -> None:
        self._writing = False
        flags = iter(inserted)
        for run, d in batch:
            d.callback(next(flags) if run is not None else None)
        self._kick()

    def _write_failed(self, failure: Any, batch: list[tuple[Optional[Run], Deferred[Any]]]) -> None:
        self._writing = False
        log.failure("cannot write {count} runs to {path}", failure, count=len(batch), path=str(self.path))
        for _, d in batch:
            d.errback(failure)
        self._kick()

    # -- reading -----------------------------------------------------------
    def completed(self, event_guid: str) -> Deferred[set[tuple[str, str, str]]]:
        d: Deferred[Any] = self._when_ready()
        d.addCallback(lambda _: self._open_pool().runQuery(
            "SELECT repo, service, action FROM runs WHERE event_guid = ?", (event_guid,)))
        d.addCallback(lambda rows: {tuple(row) for row in rows})
        return d

    def get(self, run_id: str) -> Deferred[Optional[Run]]:
        d: Deferred[Any] = self._when_ready()
        d.addCallback(lambda _: self._open_pool().runQuery(
            f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", (run_id,)))
        d.addCallback(lambda rows: _from_row(rows[0]) if rows else None)
        return d

    def list(self, limit: int = 50, before: Optional[str] = None, **filters: Optional[str]) -> Deferred[List[Run]]:
        try:
            where, params = _where(filters)
        except ValueError as exc:
            return defer.fail(exc)
        if before:
            where.append("id < ?")
            params.append(before)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        d: Deferred[Any] = self._when_ready()
        d.addCallback(lambda _: self._open_pool().runQuery(sql, (*params, int(limit))))
        d.addCallback(lambda rows: [_from_row(row) for row in rows])
        return d

    def count(self, **filters: Optional[str]) -> Deferred[int]:
        try:
            where, params = _where(filters)
        except ValueError as exc:
            return defer.fail(exc)
        sql = "SELECT COUNT(*) FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        d: Deferred[Any] = self._when_ready()
        d.addCallback(lambda _: self._open_pool().runQuery(sql, tuple(params)))
        d.addCallback(lambda rows: rows[0][0])
        return d

    # -- pruning -----------------------------------------------------------
    def prune(self, now: Optional[float] = None) -> Deferred[int]:
        bound = id_bound((self.clock.seconds() if now is None else now) - self.keep_days * 86400)

        def interaction(cursor: Any) -> int:
            cursor.execute("DELETE FROM runs WHERE id < ?", (bound,))
            removed: int = cursor.rowcount
            cursor.execute("DELETE FROM runs WHERE id < (SELECT id FROM runs ORDER BY id DESC LIMIT 1 OFFSET ?)",
                           (self.keep_runs - 1,))
            over: int = cursor.rowcount
            return removed + max(over, 0)

        d: Deferred[Any] = self._when_ready()
        d.addCallback(lambda _: self._open_pool().runInteraction(interaction))
        return d

    def _prune_logged(self) -> Deferred[None]:
        if self.pool is None:
            return defer.succeed(None)
        d: Deferred[Any] = self.prune()

        def pruned(count: int) -> None:
            if count:
                log.info("pruned {count} old runs", count=count)

        d.addCallback(pruned)
        d.addErrback(lambda f: log.warn("pruning runs failed: {error}", error=f.getErrorMessage()))
        return d
