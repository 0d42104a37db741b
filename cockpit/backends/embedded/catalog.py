"""The AYS catalog on disk, for one process: ``[ays] repos`` in the layout of docs/design.md §7.

The blocking work is :class:`cockpit.repos.RepoStore`'s, run in threads, one job at a time,
so that no two threads rewrite one file. Action states are gathered for ``flush_delay``
seconds and written together: a busy robot rewrites a service's file once for many runs.
There is no change feed: nobody else changes these files while the cockpit runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit.ays_catalog import CatalogStore, Loaded, Position, RepoMeta
from cockpit.repos import NEW_STATUS, RepoStore, ServiceRecord, Template

log = Logger()

_T = TypeVar("_T")


class DiskCatalogStore(CatalogStore):
    kind = "disk"
    shared = False

    def __init__(self, root: Path, clock: IReactorTime, flush_delay: float = 0.5) -> None:
        self.files = RepoStore(Path(root))
        self.clock = clock
        self.flush_delay = flush_delay
        self._lock = DeferredLock()
        # states not written yet: (repo, key) -> (action -> state, updated)
        self._pending: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
        self._pending_waiters: list[Deferred[Optional[int]]] = []
        self._flush_call: Any = None

    def describe(self) -> str:
        return f"the directory {self.files.root}"

    def _blocking(self, work: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return self._lock.run(threads.deferToThread, work, *args)

    # -- reading -----------------------------------------------------------------
    def load(self) -> Deferred[Loaded]:
        def load_all() -> Loaded:
            self.files.root.mkdir(parents=True, exist_ok=True)
            return Loaded(Position(), {name: self.files.load_repo(name) for name in self.files.list_repos()})

        return self._blocking(load_all)

    def read_template_files(self, repo: str, name: str) -> Deferred[dict[str, str]]:
        return threads.deferToThread(self.files.read_template_files, repo, name)

    def read_blueprint(self, repo: str, name: str) -> Deferred[str]:
        return threads.deferToThread(self.files.read_blueprint, repo, name)

    # -- repositories and templates ---------------------------------------------------
    def create_repo(self, repo: str, created: float) -> Deferred[RepoMeta]:
        d = self._blocking(self.files.create_repo, repo, created)
        return d.addCallback(lambda meta: RepoMeta(meta["created"], None))

    def delete_repo(self, repo: str) -> Deferred[object]:
        self._pending = {k: v for k, v in self._pending.items() if k[0] != repo}
        return self._blocking(self.files.delete_repo, repo)

    def put_template(self, repo: str, name: str, files: dict[str, str]) -> Deferred[tuple[Template, bool]]:
        return self._blocking(self.files.put_template, repo, name, files)

    # -- blueprints ----------------------------------------------------------------
    def put_blueprint(self, repo: str, name: str, content: str, create: bool) -> Deferred[object]:
        def put() -> None:
            self.files.write_blueprint(repo, name, content, create)
            self.files.set_blueprint_status(repo, name, dict(NEW_STATUS))

        return self._blocking(put)

    def delete_blueprint(self, repo: str, name: str) -> Deferred[object]:
        return self._blocking(self.files.delete_blueprint, repo, name)

    def set_blueprint_status(self, repo: str, name: str, status: dict[str, Any]) -> Deferred[object]:
        return self._blocking(self.files.set_blueprint_status, repo, name, status)

    # -- services ---------------------------------------------------------------------
    def put_services(self, repo: str,
                     records: list[ServiceRecord]) -> Deferred[tuple[list[ServiceRecord], Optional[int]]]:
        d = self._blocking(lambda: [self.files.put_service(record) for record in records])
        return d.addCallback(lambda stored: (stored, None))

    def delete_service(self, repo: str, key: str) -> Deferred[object]:
        self._pending.pop((repo, key), None)
        return self._blocking(self.files.delete_service, repo, key)

    def set_states(self, repo: str, key: str, states: dict[str, str], updated: float) -> Deferred[Optional[int]]:
        pending = self._pending.get((repo, key))
        if pending is None:
            self._pending[(repo, key)] = (dict(states), updated)
        else:
            pending[0].update(states)
            self._pending[(repo, key)] = (pending[0], max(pending[1], updated))
        d: Deferred[Optional[int]] = Deferred()
        self._pending_waiters.append(d)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(self.flush_delay, self.flush)
        return d

    def flush(self) -> Deferred[None]:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        batch, self._pending = self._pending, {}
        waiters, self._pending_waiters = self._pending_waiters, []

        def write() -> None:
            for (repo, key), (states, updated) in batch.items():
                try:
                    self.files.set_service_states(repo, key, states, updated)
                except Exception:
                    log.failure("cannot write the states of {service} in {repo}", service=key, repo=repo)

        d = self._blocking(write) if batch else defer.succeed(None)

        def done(result: Any) -> Any:
            for waiter in waiters:
                waiter.callback(None)
            return result

        return d.addBoth(done)

    def stop(self) -> Deferred[None]:
        return self.flush()
