"""The AYS catalog: repositories, templates, blueprints, services and their action states.

A :class:`CatalogStore` keeps them: on disk under ``[ays] repos`` in the layout of docs/design.md §7
(:mod:`cockpit.backends.embedded.catalog`, one process), or in Redis, shared by every
cockpit process on it (:mod:`cockpit.backends.redis.catalog`). Every store call returns a
Deferred; disk work and big parsing happen in threads.

:class:`Catalog` is this process's view of its store: a cache in memory, which the robot
and the chat read without waiting (the REST API and the Telegram keyboards bring it up to
date first, :meth:`Catalog.view`). Every change made through it goes to the store first,
then into the cache. A shared store also keeps a change feed: the catalog
follows it, applying each change by taking the current value of the object it names, which
is idempotent. :meth:`Catalog.sync` brings the cache up to every change made before the
call (the robot's consumer calls it after each read, before it handles what it read); a
feed that no longer reaches back to the cache's position, or a store that lost its data,
makes it load everything again.

Action states are written per field (one service, some actions) and never from a copy: a
state this process has not confirmed yet is not replaced by an older one read back.

The errors are those of :mod:`cockpit.repos` (NotFound, Conflict, Invalid), and
Unavailable before the first load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit import repos as model
from cockpit.bus import BusUnavailable
from cockpit.repos import NEW_STATUS, Invalid, NotFound, RepoSnapshot, ServiceRecord, Template, Unavailable

log = Logger()

_T = TypeVar("_T")

CHANGES_PER_READ = 1000  # feed entries applied per round trip when catching up
LOAD_WAIT = 10.0  # seconds a request made right after the start waits for the first load
RETRY_DELAY = 1.0  # seconds between attempts to load, or to follow a feed that cannot be read


@dataclass(frozen=True)
class Subscription:
    repo: str
    service: str
    action: str


@dataclass(frozen=True)
class Position:
    """How far a view has applied the change feed: its last entry's id and the version it made."""

    id: str = "0-0"
    version: int = 0


@dataclass(frozen=True)
class RepoMeta:
    """What a ``repo`` change reads back: when it was made, and what tells it from an older namesake."""

    created: Optional[float]
    incarnation: Optional[str]


@dataclass
class Change:
    """One entry of the change feed, with the current value of what it names (None: it is gone).

    ``kind`` and ``value``: ``repo`` RepoMeta; ``template`` a Template, or a str saying why it
    cannot be loaded; ``blueprint`` its status; ``service`` a ServiceRecord with its states;
    ``catalog`` (no value): everything changed, load it all again. ``latest`` is False when a
    later entry of the same read names the same object: only the last one is applied.
    """

    id: str
    version: int
    kind: str
    repo: str
    name: str
    value: Any = None
    latest: bool = True


@dataclass
class Changes:
    """What came after a position: the version the values were read at, and the entries in order."""

    version: int
    entries: list[Change]


@dataclass
class Loaded:
    position: Position
    repos: dict[str, RepoSnapshot]


class CatalogStore:
    """Where the catalog lives. Every method returns a Deferred; the errors are those of cockpit.repos."""

    kind = "abstract"
    shared = False  # other processes change it too: the catalog follows its change feed

    def start(self) -> None:
        """Open what the store needs (connections of its own)."""

    def stop(self) -> Deferred[None]:
        """Write what is still pending, then close."""
        return defer.succeed(None)

    def flush(self) -> Deferred[None]:
        """Fires once every state given to :meth:`set_states` so far is stored."""
        return defer.succeed(None)

    def describe(self) -> str:
        raise NotImplementedError

    def load(self) -> Deferred[Loaded]:
        """Fires with Loaded: every repository, and the feed position the load is consistent with."""
        raise NotImplementedError

    def changes(self, after: Position, limit: int) -> Deferred[Changes]:
        """Fires with the Changes after ``after`` (at most ``limit`` entries)."""
        raise NotImplementedError

    def wait_for_change(self, after: Position) -> Deferred[None]:
        """Fires when the feed has an entry after ``after``, or after a while without one."""
        raise NotImplementedError

    def create_repo(self, repo: str, created: float) -> Deferred[RepoMeta]:
        """Fires with the new repository's RepoMeta; Conflict when it exists."""
        raise NotImplementedError

    def delete_repo(self, repo: str) -> Deferred[object]:
        raise NotImplementedError

    def put_template(self, repo: str, name: str, files: dict[str, str]) -> Deferred[tuple[Template, bool]]:
        """Check, parse and store a template's files (replacing them all); fires (Template, created)."""
        raise NotImplementedError

    def read_template_files(self, repo: str, name: str) -> Deferred[dict[str, str]]:
        raise NotImplementedError

    def read_blueprint(self, repo: str, name: str) -> Deferred[str]:
        raise NotImplementedError

    def put_blueprint(self, repo: str, name: str, content: str, create: bool) -> Deferred[object]:
        """Store a blueprint (``create``: it must not exist; else it must) and reset its status to new."""
        raise NotImplementedError

    def delete_blueprint(self, repo: str, name: str) -> Deferred[object]:
        raise NotImplementedError

    def set_blueprint_status(self, repo: str, name: str, status: dict[str, Any]) -> Deferred[object]:
        """Record a blueprint's last execution; nothing happens when it is gone."""
        raise NotImplementedError

    def put_services(self, repo: str,
                     records: list[ServiceRecord]) -> Deferred[tuple[list[ServiceRecord], Optional[int]]]:
        """Create services, or change existing ones' template, args and blueprint (never their states);
        a new one starts with the states its record has. Fires (the records as stored, with the states
        they have now; the version they were read at, or None)."""
        raise NotImplementedError

    def delete_service(self, repo: str, key: str) -> Deferred[object]:
        raise NotImplementedError

    def set_states(self, repo: str, key: str, states: dict[str, str], updated: float) -> Deferred[Optional[int]]:
        """Set some action states of one service, each its own field; nothing happens when it is gone.

        Fires once stored, with the version of the change it made (None: no feed, or the service is gone).
        """
        raise NotImplementedError


class _Shared:
    """One Deferred outcome that several callers wait on."""

    def __init__(self) -> None:
        self.waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d

    def fire(self, result: Optional[BaseException]) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(result, Exception):
                d.errback(result)
            else:
                d.callback(None)


class _Written:
    """States of one field written by this process: how many writes are on their way, and the
    version of the last one stored."""

    __slots__ = ("pending", "version")

    def __init__(self) -> None:
        self.pending = 0
        self.version = -1

    def newer_than(self, version: int) -> bool:
        return self.pending > 0 or self.version > version


class Catalog(Service):
    """This process's view of the catalog; see the module docstring. Start it, then wait for ``ready``."""

    def __init__(self, store: CatalogStore, clock: IReactorTime, follow: bool = True) -> None:
        self.store = store
        self.clock = clock
        # follow the feed as it grows; without it the view catches up only when sync() asks
        self.follow = follow
        self.repos: dict[str, RepoSnapshot] = {}
        self.position = Position()
        self.loaded = False
        self.ready: Deferred[None] = Deferred()
        self._lock = DeferredLock()  # changes made here, and catching up, one at a time
        self._queued: Optional[_Shared] = None  # a catch-up waiting for the lock, which callers may join
        # states written here and not yet read back: an older value read back does not replace them
        self._own_states: dict[tuple[str, str, str], _Written] = {}
        self._index: Optional[tuple[dict[str, list[Subscription]], list[tuple[Subscription, float]]]] = None
        self._following: Optional[Deferred[None]] = None
        self._loading: Optional[Deferred[None]] = None
        self._sleeping: Optional[Deferred[None]] = None
        self._follow_failing = False
        self.load_error: Optional[str] = None  # why the last attempt to load failed, while none has worked
        self._version_waiters: list[tuple[int, Deferred[int]]] = []
        self._load_waiters: list[Deferred[None]] = []
        self.reloads = 0  # full loads after the first (the feed did not reach back, or the store lost its data)

    # ------------------------------------------------------------------
    # lifetime
    # ------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.store.start()
        self._loading = self._load_until_done()

    @inlineCallbacks
    def _load_until_done(self) -> Generator[Deferred[None], None, None]:
        failing = False
        while self.running:
            try:
                yield self._lock.run(self._first_load)
                self.load_error = None
                break
            except Exception as exc:
                if not self.running:
                    return
                self.load_error = str(exc)
                if not failing:
                    log.warn("the AYS catalog cannot be loaded from {store}: {error}; retrying every {delay} s",
                             store=self.store.describe(), error=exc, delay=RETRY_DELAY)
                failing = True
                yield self._sleep()
        if not self.running:
            return
        self.ready.callback(None)
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)
        if self.store.shared and self.follow:
            self._following = self._follow()

    @inlineCallbacks
    def _first_load(self) -> Generator[Deferred[Loaded], Loaded, None]:
        loaded = yield self.store.load()
        self._install(loaded)
        for repo in loaded.repos.values():
            for template, why in sorted(repo.broken.items()):
                log.warn("repository {repo}: template {template} is not loaded: {why}",
                         repo=repo.name, template=template, why=why)
        log.info("AYS catalog: {repos} repositories, {services} services, in {store}",
                 repos=len(self.repos), services=sum(len(r.services) for r in self.repos.values()),
                 store=self.store.describe())

    def _install(self, loaded: Loaded) -> None:
        version = loaded.position.version
        kept = {}
        for (repo, key, action), written in self._own_states.items():
            old = self.repos.get(repo)
            service = old.services.get(key) if old is not None else None
            if written.newer_than(version) and service is not None and action in service.states:
                kept[(repo, key, action)] = service.states[action]
        self.repos = loaded.repos
        self.position = loaded.position
        self.loaded = True
        for (repo, key, action), state in kept.items():  # what this process wrote since still counts
            snapshot = self.repos.get(repo)
            service = snapshot.services.get(key) if snapshot is not None else None
            if service is not None:
                service.states[action] = state
        self._forget_own_states(version)
        self._changed()
        self._moved()

    def _moved(self) -> None:
        if self._version_waiters:
            due = [(v, d) for v, d in self._version_waiters if v <= self.position.version]
            for entry in due:
                self._version_waiters.remove(entry)
            for _, d in due:
                d.callback(self.position.version)

    def when_caught_up(self, version: int) -> Deferred[int]:
        """Fires once this view has applied the changes up to ``version`` (at once if it has)."""
        if self.loaded and self.position.version >= version:
            return defer.succeed(self.position.version)
        d: Deferred[int] = Deferred(lambda d: self._version_waiters.remove((version, d)))
        self._version_waiters.append((version, d))
        return d

    def _sleep(self) -> Deferred[None]:
        self._sleeping = task.deferLater(self.clock, RETRY_DELAY, lambda: None)
        self._sleeping.addErrback(lambda f: f.trap(defer.CancelledError))
        return self._sleeping

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[None], None, None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self._sleeping is not None and not self._sleeping.called:
            self._sleeping.cancel()
        yield self.store.stop()  # closes the feed's connection: its wait ends there
        if not self.ready.called:
            self.ready.errback(Unavailable("the AYS catalog stopped before it was loaded"))
            self.ready.addErrback(lambda f: None)

    @inlineCallbacks
    def _follow(self) -> Generator[Deferred[None], None, None]:
        while self.running:
            try:
                yield self.store.wait_for_change(self.position)
                if self.running:
                    yield self.sync()
                if self._follow_failing:
                    log.info("AYS catalog: following {store} again", store=self.store.describe())
                    self._follow_failing = False
            except Exception as exc:
                if not self.running:
                    return
                if not self._follow_failing:
                    log.warn("AYS catalog: cannot follow the changes in {store}: {error}; retrying every {delay} s",
                             store=self.store.describe(), error=exc, delay=RETRY_DELAY)
                    self._follow_failing = True
                yield self._sleep()

    def health(self) -> dict[str, Any]:
        """ok while loaded, or loading; not while the store cannot be loaded (``error`` says why)."""
        return {"ok": self.load_error is None, "store": self.store.kind, "loaded": self.loaded,
                "repos": len(self.repos), "version": self.position.version, "reloads": self.reloads,
                "error": self.load_error}

    def flush(self) -> Deferred[None]:
        """Fires once the states set so far are stored."""
        return self.store.flush()

    # ------------------------------------------------------------------
    # catching up with the feed
    # ------------------------------------------------------------------
    def sync(self) -> Deferred[None]:
        """Fires once this view has every change made before the call (at once for a store of its own)."""
        if not self.store.shared:
            return defer.succeed(None)
        if not self.loaded:
            return defer.fail(Unavailable("the AYS catalog is still loading"))
        if self._queued is not None:  # a catch-up that has not started yet reads late enough for us too
            return self._queued.wait()
        queued = self._queued = _Shared()
        waiting = queued.wait()

        def run() -> Deferred[None]:
            if self._queued is queued:
                self._queued = None  # from now on a caller needs a catch-up that starts after it
            return defer.maybeDeferred(self._catch_up)

        self._lock.run(run).addBoth(lambda result: queued.fire(
            result.value if isinstance(result, Failure) else None))
        return waiting

    def when_loaded(self, timeout: float = LOAD_WAIT) -> Deferred[None]:
        """Fires once the first load is done: a request that comes right after the start waits for it,
        for ``timeout`` seconds at most, then fails with Unavailable."""
        if self.loaded:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._load_waiters.append(d)

        def too_late() -> None:
            if not d.called:
                self._load_waiters.remove(d)
                d.errback(Unavailable("the AYS catalog is still loading; try again in a moment"
                                      + (f" ({self.load_error})" if self.load_error else "")))

        call = self.clock.callLater(timeout, too_late)

        def loaded(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(loaded)

    def view(self) -> Deferred[Catalog]:
        """Fires with this catalog once it is current; current as it is when the store cannot be asked
        (nobody can change it then). Right after the start, once it is loaded (:meth:`when_loaded`)."""
        def current(_: Any) -> Deferred[Catalog]:
            d = self.sync()
            d.addErrback(lambda f: f.trap(BusUnavailable))
            return d.addCallback(lambda _: self)

        return self.when_loaded().addCallback(current)

    @inlineCallbacks
    def _catch_up(self) -> Generator[Deferred[Any], Any, None]:
        """Apply every change after our position (the lock is held)."""
        while True:
            changes = yield self.store.changes(self.position, CHANGES_PER_READ)
            entries = changes.entries
            why = self._why_reload(changes)
            if why is not None:
                yield self._reload(why)
                continue
            if not entries:
                return
            for change in entries:
                self._apply(change, changes.version)
            self.position = Position(entries[-1].id, entries[-1].version)
            self._forget_own_states(changes.version)
            self._moved()
            if len(entries) < CHANGES_PER_READ:
                return

    def _why_reload(self, changes: Changes) -> Optional[str]:
        expected = self.position.version
        if not changes.entries:
            if changes.version < expected:
                return f"its version went back from {expected} to {changes.version} (did Redis lose its data?)"
            if changes.version > expected:
                return f"its change feed no longer reaches back to version {expected}"
            return None
        for change in changes.entries:
            expected += 1
            if change.version != expected:
                return (f"its change feed went from version {expected - 1} to {change.version}"
                        if change.version > expected else
                        f"its version went back to {change.version} from {expected - 1} (did Redis lose its data?)")
            if change.kind == "catalog":
                return "its repositories were imported or replaced"
        return None

    @inlineCallbacks
    def _reload(self, why: str) -> Generator[Deferred[Loaded], Loaded, None]:
        loaded = yield self.store.load()
        self._install(loaded)
        self.reloads += 1
        log.warn("AYS catalog: loaded everything again because {why}: {repos} repositories, at version {version}",
                 why=why, repos=len(self.repos), version=self.position.version)

    def _apply(self, change: Change, version: int) -> None:
        if not change.latest:
            return
        name, value = change.name, change.value
        if change.kind == "repo":
            if value is None:
                self.repos.pop(change.repo, None)
            else:
                old = self.repos.get(change.repo)
                if old is None or old.incarnation != value.incarnation:  # made anew since
                    self.repos[change.repo] = RepoSnapshot(change.repo, value.created, incarnation=value.incarnation)
            self._changed()
            return
        repo = self.repos.get(change.repo)
        if repo is None:
            return  # deleted since: the repo's own entry says so
        if change.kind == "template":
            repo.templates.pop(name, None)
            repo.broken.pop(name, None)
            if isinstance(value, Template):
                repo.templates[name] = value
            elif isinstance(value, str):
                repo.broken[name] = value
            self._changed()
        elif change.kind == "blueprint":
            if value is None:
                repo.blueprints.pop(name, None)
            else:
                repo.blueprints[name] = value
        elif change.kind == "service":
            if value is None:
                repo.services.pop(name, None)
                self._changed()
            else:
                self._replace_service(repo, value, version)
        else:
            log.warn("AYS catalog: ignored a change of an unknown kind {kind!r}", kind=change.kind)

    def _replace_service(self, repo: RepoSnapshot, record: ServiceRecord, version: Optional[int]) -> None:
        """Put ``record`` (as read back at ``version``) in the view; states written here since stay."""
        old = repo.services.get(record.key)
        if old is not None and self._own_states:
            for action, state in old.states.items():
                written = self._own_states.get((repo.name, record.key, action))
                if written is not None and (version is None or written.newer_than(version)):
                    record.states[action] = state
        repo.services[record.key] = record
        if old is None or old.template != record.template:
            self._changed()

    def _forget_own_states(self, version: int) -> None:
        if self._own_states:
            self._own_states = {field: w for field, w in self._own_states.items() if w.newer_than(version)}

    # ------------------------------------------------------------------
    # the index of subscriptions
    # ------------------------------------------------------------------
    def _changed(self) -> None:
        self._index = None

    def _build_index(self) -> tuple[dict[str, list[Subscription]], list[tuple[Subscription, float]]]:
        if self._index is None:
            subs: dict[str, list[Subscription]] = {}
            recurring: list[tuple[Subscription, float]] = []
            for repo in self.repos.values():
                for key, service in repo.services.items():
                    template = repo.templates.get(service.template)
                    if template is None:
                        continue
                    for kind, actions in template.spec.events.items():
                        subs.setdefault(kind, []).extend(Subscription(repo.name, key, a) for a in actions)
                    recurring.extend((Subscription(repo.name, key, a), period)
                                     for a, period in template.spec.recurring.items())
            self._index = (subs, recurring)
        return self._index

    def subscribers(self, event_type: str) -> list[Subscription]:
        """The actions subscribed to ``event_type`` (matched without case)."""
        return self._build_index()[0].get(event_type.lower(), [])

    def recurring(self) -> list[tuple[Subscription, float]]:
        """Every recurring action, with its period in seconds."""
        return self._build_index()[1]

    # ------------------------------------------------------------------
    # reading (from the cache)
    # ------------------------------------------------------------------
    def repo(self, name: str) -> RepoSnapshot:
        if not self.loaded:
            raise Unavailable("the AYS catalog is still loading; try again in a moment")
        model.check_repo_name(name)
        repo = self.repos.get(name)
        if repo is None:
            raise NotFound(f"no repository {name!r}")
        return repo

    def repo_names(self) -> list[str]:
        if not self.loaded:
            raise Unavailable("the AYS catalog is still loading; try again in a moment")
        return sorted(self.repos)

    def service(self, repo: str, key: str) -> ServiceRecord:
        model.split_key(key)
        service = self.repo(repo).services.get(key)
        if service is None:
            raise NotFound(f"no service {key!r} in repository {repo!r}")
        return service

    def template_of(self, service: ServiceRecord) -> Optional[Template]:
        repo = self.repos.get(service.repo)
        return repo.templates.get(service.template) if repo is not None else None

    @staticmethod
    def repo_summary(repo: RepoSnapshot) -> dict[str, Any]:
        return {"name": repo.name, "created": repo.created, "templates": sorted(repo.templates),
                "broken_templates": dict(repo.broken), "services": sorted(repo.services),
                "blueprints": {name: dict(status) for name, status in sorted(repo.blueprints.items())}}

    def list_repos(self) -> list[dict[str, Any]]:
        return [self.repo_summary(self.repos[name]) for name in self.repo_names()]

    def get_repo(self, name: str) -> dict[str, Any]:
        return self.repo_summary(self.repo(name))

    def list_templates(self, repo: str) -> list[dict[str, Any]]:
        return [template.to_dict() for _, template in sorted(self.repo(repo).templates.items())]

    def list_services(self, repo: str) -> list[dict[str, Any]]:
        snapshot = self.repo(repo)
        return [service.to_dict(snapshot.templates.get(service.template))
                for _, service in sorted(snapshot.services.items())]

    def get_service(self, repo: str, key: str) -> dict[str, Any]:
        service = self.service(repo, key)
        return service.to_dict(self.template_of(service))

    def blueprint_names(self, repo: str) -> list[str]:
        return sorted(self.repo(repo).blueprints)

    def _status(self, repo: str, name: str) -> dict[str, Any]:
        status = self.repo(repo).blueprints.get(name)
        if status is None:
            raise NotFound(f"no blueprint {name!r} in repository {repo!r}")
        return dict(status)

    def list_blueprints(self, repo: str) -> list[dict[str, Any]]:
        snapshot = self.repo(repo)
        return [{"name": name, "repo": repo, **status} for name, status in sorted(snapshot.blueprints.items())]

    # -- what the cache does not hold: the files' text ------------------------------
    @inlineCallbacks
    def get_template(self, repo: str, name: str) -> Generator[Deferred[dict[str, str]], dict[str, str], dict[str, Any]]:
        snapshot = self.repo(repo)
        model.check_template_name(name)
        files = yield self.store.read_template_files(repo, name)
        template = snapshot.templates.get(name)
        if template is None:  # stored but broken: show the files and why
            return {"name": name, "repo": repo, "files": files, "error": snapshot.broken.get(name)}
        return template.to_dict(files)

    @inlineCallbacks
    def get_blueprint(self, repo: str, name: str) -> Generator[Deferred[str], str, dict[str, Any]]:
        self.repo(repo)
        name = model.blueprint_name(name)
        content = yield self.store.read_blueprint(repo, name)
        status = self.repo(repo).blueprints.get(name) or NEW_STATUS
        return {"name": name, "repo": repo, "content": content, **status}

    # ------------------------------------------------------------------
    # changing (through the store, then the cache)
    # ------------------------------------------------------------------
    def _change(self, work: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """Run ``work`` holding the lock, this view first brought up to date (once it is loaded)."""
        @inlineCallbacks
        def locked() -> Generator[Deferred[Any], Any, _T]:
            if self.store.shared:  # so that checks against the view see what other processes did
                yield self._catch_up()
            done: _T = yield work()
            return done

        return self.when_loaded().addCallback(lambda _: self._lock.run(locked))

    def create_repo(self, name: str) -> Deferred[dict[str, Any]]:
        """Fires with the new repository's summary; Conflict when it exists."""
        model.check_repo_name(name)

        @inlineCallbacks
        def work() -> Generator[Deferred[RepoMeta], RepoMeta, dict[str, Any]]:
            meta = yield self.store.create_repo(name, self.clock.seconds())
            self.repos[name] = RepoSnapshot(name, meta.created, incarnation=meta.incarnation)
            self._changed()
            return self.get_repo(name)

        return self._change(work)

    def delete_repo(self, name: str) -> Deferred[None]:
        model.check_repo_name(name)

        @inlineCallbacks
        def work() -> Generator[Deferred[object], object, None]:
            yield self.store.delete_repo(name)
            self.repos.pop(name, None)
            self._own_states = {f: w for f, w in self._own_states.items() if f[0] != name}
            self._changed()

        return self._change(work)

    def put_template(self, repo: str, name: str, files: Any) -> Deferred[tuple[dict[str, Any], bool]]:
        """Store a template's files (replacing it); fires (template dict, created)."""
        model.check_repo_name(repo)
        model.check_template_name(name)

        @inlineCallbacks
        def work() -> Generator[Deferred[tuple[Template, bool]], tuple[Template, bool], tuple[dict[str, Any], bool]]:
            self.repo(repo)
            template, created = yield self.store.put_template(repo, name, files)
            snapshot = self.repos.get(repo)
            if snapshot is not None:
                snapshot.templates[name] = template
                snapshot.broken.pop(name, None)
                self._changed()
            return template.to_dict(), created

        return self._change(work)

    def add_blueprint(self, repo: str, name: str, content: Any, create: bool = True) -> Deferred[dict[str, Any]]:
        """Store a blueprint (new when ``create``, else replacing one); fires its dict."""
        model.check_repo_name(repo)
        name = model.blueprint_name(name)

        @inlineCallbacks
        def work() -> Generator[Deferred[Any], Any, dict[str, Any]]:
            self.repo(repo)
            # parsed here, off the reactor, so that a broken one is refused with why before it is stored
            text = yield threads.deferToThread(model.check_blueprint_content, content)
            yield self.store.put_blueprint(repo, name, text, create)
            snapshot = self.repos.get(repo)
            if snapshot is not None:
                snapshot.blueprints[name] = dict(NEW_STATUS)
            return {"name": name, "repo": repo, "content": text, **NEW_STATUS}

        return self._change(work)

    def delete_blueprint(self, repo: str, name: str) -> Deferred[None]:
        model.check_repo_name(repo)
        name = model.blueprint_name(name)

        @inlineCallbacks
        def work() -> Generator[Deferred[object], object, None]:
            self.repo(repo)
            yield self.store.delete_blueprint(repo, name)
            snapshot = self.repos.get(repo)
            if snapshot is not None:
                snapshot.blueprints.pop(name, None)

        return self._change(work)

    def set_blueprint_status(self, repo: str, name: str, status: dict[str, Any]) -> Deferred[None]:
        """Record a blueprint's last execution (nothing happens when it is gone)."""
        return self._lock.run(self._set_status_locked, repo, name, status)

    @inlineCallbacks
    def _set_status_locked(self, repo: str, name: str,
                           status: dict[str, Any]) -> Generator[Deferred[object], object, None]:
        yield self.store.set_blueprint_status(repo, name, status)
        snapshot = self.repos.get(repo)
        if snapshot is not None and name in snapshot.blueprints:
            snapshot.blueprints[name] = dict(status)

    def delete_service(self, repo: str, key: str) -> Deferred[None]:
        model.check_repo_name(repo)
        model.split_key(key)

        @inlineCallbacks
        def work() -> Generator[Deferred[object], object, None]:
            self.service(repo, key)
            yield self.store.delete_service(repo, key)
            snapshot = self.repos.get(repo)
            if snapshot is not None:
                snapshot.services.pop(key, None)
            self._own_states = {f: w for f, w in self._own_states.items() if f[:2] != (repo, key)}
            self._changed()

        return self._change(work)

    def put_services(self, repo: str, records: list[ServiceRecord]) -> Deferred[list[ServiceRecord]]:
        """Create or update services as :meth:`CatalogStore.put_services` does; fires with them as stored."""
        model.check_repo_name(repo)
        return self._change(lambda: self._put_services(repo, records))

    @inlineCallbacks
    def _put_services(self, repo: str, records: list[ServiceRecord]
                      ) -> Generator[Deferred[tuple[list[ServiceRecord], Optional[int]]],
                                     tuple[list[ServiceRecord], Optional[int]], list[ServiceRecord]]:
        self.repo(repo)
        stored, version = yield self.store.put_services(repo, records)
        snapshot = self.repos.get(repo)
        if snapshot is not None:
            for record in stored:
                old = snapshot.services.get(record.key)
                if old is not None and not self.store.shared:
                    record.states = old.states  # for a store of its own, this view has every state set
                self._replace_service(snapshot, record, version)
        return stored

    def prepare_blueprint(self, repo: str, name: str) -> Deferred[list[ServiceRecord]]:
        """Create or update the blueprint's services and mark it running; fires with them, in file order.

        Invalid (and the blueprint keeps the error in its status) when it cannot be executed.
        """
        model.check_repo_name(repo)
        name = model.blueprint_name(name)

        @inlineCallbacks
        def work() -> Generator[Deferred[Any], Any, list[ServiceRecord]]:
            snapshot = self.repo(repo)
            content = yield self.store.read_blueprint(repo, name)
            try:
                entries = yield threads.deferToThread(model.parse_blueprint, content)
                records = model.blueprint_services(repo, name, entries, snapshot.templates, snapshot.services,
                                                   self.clock.seconds())
            except Invalid as exc:
                yield self._set_status_locked(repo, name, {"state": "error", "error": str(exc),
                                                           "executed": self.clock.seconds()})
                raise
            stored: list[ServiceRecord] = yield self._put_services(repo, records)
            yield self._set_status_locked(repo, name, {"state": "running", "error": None,
                                                       "executed": self.clock.seconds()})
            return stored

        return self._change(work)

    def set_state(self, repo: str, key: str, action: str, state: str) -> Deferred[Optional[int]]:
        """Record ``action``'s state of a service, in this view at once and in the store; fires once stored."""
        now = self.clock.seconds()
        snapshot = self.repos.get(repo)
        service = snapshot.services.get(key) if snapshot is not None else None
        if service is not None:
            service.states[action] = state
            service.updated = max(service.updated, now)
        if not self.store.shared:
            return self.store.set_states(repo, key, {action: state}, now)
        field = (repo, key, action)
        written = self._own_states.get(field)
        if written is None:
            written = self._own_states[field] = _Written()
        written.pending += 1
        d = self.store.set_states(repo, key, {action: state}, now)

        def settled(result: Any) -> Any:
            written.pending -= 1
            if not isinstance(result, Failure) and result is not None:
                written.version = max(written.version, result)
            if not written.newer_than(self.position.version) and self._own_states.get(field) is written:
                del self._own_states[field]  # read back already, not stored, or the service is gone
            return result

        return d.addBoth(settled)
