"""The AYS robot: events in, action runs out.

It consumes every ``ckpt.<type>`` stream with the group ``ays``. For each event it
runs the subscribed actions (``events.<type>`` in a template's ``service.hrd``) of
every service, with the event as payload, in the worker pool. The entry is
acknowledged only when all those runs are recorded in the run history; on
redelivery a run already recorded for (event guid, service, action) is not run
again. It also does what chat commands ask (``repo.create``, ``repo.delete``,
``bp.create``, ``bp.execute``, ``service.execute``) and answers in the chat with a
``telegram`` output event; and it runs ``recurring.<action>`` periods on a timer,
once per period across all cockpit processes sharing one Redis.

The methods the REST API calls (create_repo, put_template, add_blueprint,
execute_blueprint, run_action, ...) return Deferreds and raise the errors of
:mod:`cockpit.repos` (NotFound, Conflict, Invalid). Disk work happens in threads.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.logger import Logger

from cockpit import repos as model
from cockpit.backends.redis.bus import RedisBus  # until the catalog has a change feed of its own
from cockpit.bus import AYS_GROUP, Bus, Delivery
from cockpit.events import Event, GenericEvent, TelegramEvent, from_data
from cockpit.repos import Invalid, NotFound, RepoSnapshot, RepoStore, ServiceRecord
from cockpit.runs import DONE_STATES, Run, RunHistory
from cockpit.workers import Outcome, WorkerPool

log = Logger()

READ_LINGER = 0.004  # seconds

CHAT_ACTIONS = ("repo.create", "repo.delete", "bp.create", "bp.execute", "service.execute",
                # what the chat asks to see
                "repo.list", "bp.list", "bp.show", "bp.delete", "service.list", "service.show")
RECURRING_KEY = "ckpt.ays.recurring:{repo}:{service}:{action}:{slot}"
GENERATION_KEY = "ckpt.ays.generation"  # bumped on every change to repositories, so other processes reload
STATE_FLUSH_DELAY = 0.5  # seconds: service states are written to disk in groups, not on every run


def trigger(kind: str, event: Optional[Event] = None) -> dict[str, Any]:
    return {"kind": kind, "event_type": event.type if event is not None else None,
            "event_guid": event.guid if event is not None else None}


@dataclass(frozen=True)
class Subscription:
    repo: str
    service: str
    action: str


class Robot(Service):
    """The AYS robot; it starts and stops its run history and worker pool itself, in the right order."""

    def __init__(self, repos_dir: Path, bus: Bus, history: RunHistory, pool: WorkerPool,
                 clock: Any = None, tick: float = 1.0, concurrency: int = 256, mailer: Any = None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.store = RepoStore(Path(repos_dir))
        self.bus = bus
        self.history = history
        self.pool = pool
        pool.emit = self._publish_emitted
        if mailer is not None:
            pool.send_mail = lambda data: self._send_mail(mailer, data)
        self.clock = clock
        self.tick = tick
        self.concurrency = concurrency
        self.repos: dict[str, RepoSnapshot] = {}
        self.active: dict[str, Run] = {}
        self._running_keys: dict[tuple[Any, ...], Deferred] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._subs: Optional[dict[str, list[Subscription]]] = None
        self._recurring: Optional[list[tuple[Subscription, float]]] = None
        self._last_slot: dict[tuple[str, str, str], int] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._flush_call: Any = None
        self._flushing: Optional[Deferred] = None
        self._generation: Optional[str] = None
        self._following = False
        self._generation_read = False
        self.consumer: Any = None
        self.timer: Optional[TimerService] = None
        self.ready: Deferred = Deferred()
        self._run_waiters: list[tuple[Callable[[Run], bool], Deferred]] = []
        self._reload_waiters: list[Deferred] = []

    # ------------------------------------------------------------------
    # lifetime
    # ------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self.history.startService()
        self.pool.startService()
        d = threads.deferToThread(self._load_all)
        d.addCallback(self._loaded)
        d.addErrback(lambda f: log.failure("the AYS robot cannot load its repositories from {path}", f,
                                           path=str(self.store.root)))

    def _load_all(self) -> dict[str, RepoSnapshot]:
        self.store.root.mkdir(parents=True, exist_ok=True)
        loaded = {}
        for name in self.store.list_repos():
            snapshot = self.store.load_repo(name)
            for template, why in snapshot.broken.items():
                log.warn("repository {repo}: template {template} is not loaded: {why}",
                         repo=name, template=template, why=why)
            loaded[name] = snapshot
        return loaded

    def _loaded(self, loaded: dict[str, RepoSnapshot]) -> None:
        self.repos = loaded
        self._changed(bump=False)
        if not self.running:
            return
        log.info("AYS robot: {repos} repositories, {services} services, {workers} workers, under {path}",
                 repos=len(loaded), services=sum(len(r.services) for r in loaded.values()),
                 workers=self.pool.size, path=str(self.store.root))
        # a few milliseconds of linger between reads that came back short: under load the robot
        # reads and acknowledges in batches, at a cost to latency well inside its 20 ms goal
        linger = {"linger": READ_LINGER} if self.bus.remote else {}
        self.consumer = self.bus.consumer(AYS_GROUP, self.handle_event, concurrency=self.concurrency,
                                          drain_timeout=min(self.pool.action_timeout + 1.0, 10.0), **linger)
        self.consumer.startService()
        self.timer = TimerService(self.tick, self._tick)
        self.timer.clock = self.clock
        self.timer.startService()
        self.ready.callback(None)

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.timer is not None:
            yield self.timer.stopService()
        if self.consumer is not None:
            yield self.consumer.stopService()  # lets running events finish and be acknowledged
        yield self.pool.stopService()
        yield self._flush_states()
        yield self.history.stopService()
        # nothing more will start, be recorded or be reloaded
        for _, d in list(self._run_waiters):
            d.cancel()
        for d in list(self._reload_waiters):
            d.cancel()

    def health(self) -> dict[str, Any]:
        pool = self.pool.health()
        return {"ok": self.running and pool["ok"], "loaded": self.ready.called, "repos": len(self.repos),
                "active_runs": len(self.active), "workers": pool}

    # ------------------------------------------------------------------
    # the in-memory index
    # ------------------------------------------------------------------
    def _changed(self, bump: bool = True) -> None:
        self._subs = None
        self._recurring = None
        if bump and isinstance(self.bus, RedisBus):
            d = self.bus.execute("INCR", GENERATION_KEY)
            d.addCallback(lambda value: setattr(self, "_generation", str(value)))
            d.addErrback(lambda f: None)  # others then pick the change up on their next restart

    def subscribers(self, event_type: str) -> list[Subscription]:
        if self._subs is None:
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
            self._subs, self._recurring = subs, recurring
        return self._subs.get(event_type.lower(), [])

    def _repo(self, name: str) -> RepoSnapshot:
        model.check_repo_name(name)
        repo = self.repos.get(name)
        if repo is None:
            raise NotFound(f"no repository {name!r}")
        return repo

    def _service(self, repo: str, key: str) -> ServiceRecord:
        model.split_key(key)
        service = self._repo(repo).services.get(key)
        if service is None:
            raise NotFound(f"no service {key!r} in repository {repo!r}")
        return service

    def _lock(self, repo: str) -> DeferredLock:
        return self._locks.setdefault(repo, DeferredLock())

    def _mark(self, repo: str, key: str) -> None:
        self._dirty.add((repo, key))
        if self._flush_call is None and self._flushing is None:
            self._flush_call = self.clock.callLater(STATE_FLUSH_DELAY, self._flush_states)

    def _flush_states(self) -> Deferred:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._flushing is not None:
            return self._flushing.addCallback(lambda _: self._flush_states())
        records = []
        for repo, key in self._dirty:
            service = self.repos.get(repo) and self.repos[repo].services.get(key)
            if service:
                records.append(ServiceRecord(**{**service.__dict__, "states": dict(service.states),
                                                "args": service.args}))
        self._dirty.clear()
        if not records:
            return defer.succeed(None)

        def write() -> None:
            for record in records:
                self.store.write_service(record)

        d = threads.deferToThread(write)
        self._flushing = d
        d.addErrback(lambda f: log.failure("cannot write service states", f))

        def done(_: Any) -> None:
            self._flushing = None
            if self._dirty and self.running:
                self._mark(*next(iter(self._dirty)))

        d.addCallback(done)
        return d

    # ------------------------------------------------------------------
    # events
    # ------------------------------------------------------------------
    def handle_event(self, event: Event, delivery: Optional[Delivery] = None) -> Optional[Deferred]:
        """Run everything ``event`` asks for; fires once every run it caused is recorded.

        None when the event asks for nothing: the consumer acknowledges it at once.
        """
        targets = self.subscribers(event.type)
        chat = (isinstance(event, TelegramEvent) and event.io == "input" and event.action in CHAT_ACTIONS)
        if not targets and not chat:
            return None
        d = self.history.completed(event.guid)
        d.addCallback(self._handle_new, event, targets, chat)
        return d

    def _handle_new(self, done: set[tuple[str, str, str]], event: Event, targets: list[Subscription],
                    chat: bool) -> Deferred:
        work = []
        payload = None
        for sub in targets:
            if (sub.repo, sub.service, sub.action) in done:
                continue  # a redelivery: this run already happened and was recorded
            if payload is None:
                payload = event.to_dict()
            work.append(self._event_run(sub, event, payload))
        if chat and not any(service == "" and action == event.action for _, service, action in done):
            work.append(self._chat(event))
        return defer.gatherResults(work, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def _event_run(self, sub: Subscription, event: Event, payload: dict[str, Any]) -> Deferred:
        key = (event.guid, sub.repo, sub.service, sub.action)
        running = self._running_keys.get(key)
        if running is not None:  # the same event delivered twice at once: wait for the first
            waiter: Deferred = Deferred()
            running.addBoth(lambda result: (waiter.callback(None), result)[1])
            return waiter
        try:
            _, d = self._start(sub.repo, sub.service, sub.action, trigger("event", event), payload)
        except NotFound:
            return defer.succeed(None)  # the service went away since the index was built
        self._running_keys[key] = d
        d.addBoth(lambda result: (self._running_keys.pop(key, None), result)[1])
        return d

    def _publish_emitted(self, data: dict[str, Any]) -> Deferred:
        return defer.maybeDeferred(from_data, data).addCallback(self.bus.publish)

    @staticmethod
    def _send_mail(mailer: Any, data: dict[str, Any]) -> Deferred:
        from cockpit.smtp import OutgoingMail

        return defer.maybeDeferred(lambda: mailer.send(OutgoingMail.model_validate(data)))

    # ------------------------------------------------------------------
    # runs
    # ------------------------------------------------------------------
    def _start(self, repo: str, key: str, action: str, trig: dict[str, Any],
               event: Optional[dict[str, Any]], run: Optional[Run] = None) -> tuple[Run, Deferred]:
        """Queue a run (``run``, or a new one); returns it and a Deferred firing with it once recorded."""
        service = self._service(repo, key)
        template = self.repos[repo].templates.get(service.template)
        if template is None:
            raise NotFound(f"service {key!r} has no loaded template {service.template!r}")
        if action not in template.actions:
            raise NotFound(f"template {template.name!r} has no action {action!r}; it has "
                           + (", ".join(template.actions) or "none"))
        if run is None:
            run = Run(repo, key, action, trig)
        self.active[run.id] = run
        job = {"id": run.id, "path": str(template.actions_path), "action": action, "event": event,
               "service": {"key": key, "role": service.role, "instance": service.instance, "repo": repo,
                           "template": service.template, "args": service.args}}

        def started() -> None:
            run.state, run.started = "running", time.time()
            service.states[action] = "running"
            self._offer(run)

        d = self.pool.submit(job, on_start=started)
        d.addCallbacks(self._completed, self._not_run, callbackArgs=(run, service), errbackArgs=(run,))
        return run, d

    def _completed(self, outcome: Outcome, run: Run, service: ServiceRecord) -> Deferred:
        run.state = outcome.state
        run.started = outcome.started or run.started or time.time()
        run.ended = outcome.ended or time.time()
        run.log, run.result = outcome.log, outcome.result
        service.states[run.action] = run.state
        service.updated = run.ended
        self._mark(run.repo, service.key)
        return self._record(run)

    def _record(self, run: Run) -> Deferred:
        d = self.history.record(run)

        def recorded(_: Any) -> Run:
            self.active.pop(run.id, None)
            self._offer(run)
            return run

        def failed(failure: Any) -> Any:
            self.active.pop(run.id, None)
            return failure

        return d.addCallbacks(recorded, failed)

    def _not_run(self, failure: Any, run: Run) -> Any:
        self.active.pop(run.id, None)
        return failure

    def run_action(self, repo: str, key: str, action: str, args: Optional[dict[str, Any]] = None,
                   trig: Optional[dict[str, Any]] = None, event: Optional[Event] = None) -> tuple[Run, Deferred]:
        """Start an action by hand (REST, chat); the event it gets is ``event`` or a generic one with ``args``."""
        if event is None:
            event = GenericEvent(source="rest", tags=["action"], args=args or {})
        run, d = self._start(repo, key, action, trig or trigger("rest"), event.to_dict())
        d.addErrback(lambda f: log.warn("run {id} was not completed: {error}", id=run.id,
                                        error=f.getErrorMessage()))
        return run, d

    # -- waiting for runs ------------------------------------------------------
    def when_run(self, predicate: Callable[[Run], bool]) -> Deferred:
        """Fires with the first run from now on that ``predicate`` accepts.

        A run is offered as it starts in a worker (state ``running``) and once it is recorded
        (``ok``, ``error`` or ``timeout``); what the robot does itself (chat commands) and installs
        that never start are offered once recorded only. Cancelled when the robot stops.
        """
        d: Deferred = Deferred(lambda d: self._run_waiters.remove((predicate, d)))
        self._run_waiters.append((predicate, d))
        return d

    def when_recorded(self, run_id: str) -> Deferred:
        """Fires with the Run once it is recorded (at once if it already is); NotFound if there is no such run."""
        if run_id in self.active:  # it leaves ``active`` when it is recorded, and is offered right then
            return self.when_run(lambda run: run.id == run_id and run.state in DONE_STATES)

        def found(run: Optional[Run]) -> Run:
            if run is None:
                raise NotFound(f"no run {run_id!r}")
            return run

        return self.history.get(run_id).addCallback(found)

    def _offer(self, run: Run) -> None:
        if not self._run_waiters:
            return
        for entry in list(self._run_waiters):
            predicate, d = entry
            if entry not in self._run_waiters:  # a callback before this one cancelled it
                continue
            try:
                wanted = predicate(run)
            except Exception:
                self._run_waiters.remove(entry)
                d.errback()
                continue
            if wanted:
                self._run_waiters.remove(entry)
                d.callback(run)

    def get_run(self, run_id: str) -> Deferred:
        """Fires with the run (running or recorded) as a dict; NotFound otherwise."""
        active = self.active.get(run_id)
        if active is not None:
            return defer.succeed(active.to_dict())

        def found(run: Optional[Run]) -> dict[str, Any]:
            if run is None:
                raise NotFound(f"no run {run_id!r}")
            return run.to_dict()

        return self.history.get(run_id).addCallback(found)

    def list_runs(self, limit: int = 50, before: Optional[str] = None, **filters: Optional[str]) -> Deferred:
        """Runs newest first, the ones still going included; filters: repo, service, action, state, event_guid."""
        def matches(run: Run) -> bool:
            values = {"repo": run.repo, "service": run.service, "action": run.action, "state": run.state,
                      "event_guid": run.event_guid}
            return all(value is None or values[name] == value for name, value in filters.items())

        going = [run for run in list(self.active.values()) if (before is None or run.id < before) and matches(run)]
        if filters.get("state") in DONE_STATES:
            going = []

        def merge(recorded: list[Run]) -> list[dict[str, Any]]:
            seen = {run.id for run in recorded}
            runs = recorded + [run for run in going if run.id not in seen]
            runs.sort(key=lambda run: run.id, reverse=True)
            return [run.to_dict() for run in runs[:limit]]

        return self.history.list(limit=limit, before=before, **filters).addCallback(merge)

    # ------------------------------------------------------------------
    # repositories
    # ------------------------------------------------------------------
    def repo_summary(self, repo: RepoSnapshot) -> dict[str, Any]:
        return {"name": repo.name, "created": repo.meta.get("created"), "templates": sorted(repo.templates),
                "broken_templates": dict(repo.broken), "services": sorted(repo.services),
                "blueprints": {name: status for name, status in sorted(repo.meta.get("blueprints", {}).items())}}

    def list_repos(self) -> list[dict[str, Any]]:
        return [self.repo_summary(repo) for _, repo in sorted(self.repos.items())]

    def get_repo(self, name: str) -> dict[str, Any]:
        return self.repo_summary(self._repo(name))

    @inlineCallbacks
    def create_repo(self, name: str):
        model.check_repo_name(name)
        yield self._lock(name).acquire()
        try:
            yield threads.deferToThread(self.store.create_repo, name)
            self.repos[name] = yield threads.deferToThread(self.store.load_repo, name)
            self._changed()
        finally:
            self._lock(name).release()
        return self.get_repo(name)

    @inlineCallbacks
    def delete_repo(self, name: str):
        self._repo(name)
        yield self._lock(name).acquire()
        try:
            yield threads.deferToThread(self.store.delete_repo, name)
            self.repos.pop(name, None)
            self._changed()
        finally:
            self._lock(name).release()

    # -- templates -----------------------------------------------------------
    def list_templates(self, repo: str) -> list[dict[str, Any]]:
        return [template.to_dict() for _, template in sorted(self._repo(repo).templates.items())]

    @inlineCallbacks
    def get_template(self, repo: str, name: str):
        snapshot = self._repo(repo)
        files = yield threads.deferToThread(self.store.read_template_files, repo, name)
        template = snapshot.templates.get(name)
        if template is None:  # on disk but broken: show the files and why
            return {"name": name, "repo": repo, "files": files, "error": snapshot.broken.get(name)}
        return template.to_dict(files)

    @inlineCallbacks
    def put_template(self, repo: str, name: str, files: Any):
        """Write a template's files (replacing it); fires (template dict, created)."""
        self._repo(repo)
        model.check_template_name(name)
        yield self._lock(repo).acquire()
        try:
            template, created = yield threads.deferToThread(self.store.put_template, repo, name, files)
            snapshot = self._repo(repo)
            snapshot.templates[name] = template
            snapshot.broken.pop(name, None)
            self._changed()
        finally:
            self._lock(repo).release()
        return template.to_dict(), created

    # -- blueprints ----------------------------------------------------------
    def _blueprint_status(self, repo: str, name: str) -> dict[str, Any]:
        return self._repo(repo).meta.setdefault("blueprints", {}).get(name) or {"state": "new", "error": None,
                                                                            "executed": None}

    @inlineCallbacks
    def list_blueprints(self, repo: str):
        self._repo(repo)
        names = yield threads.deferToThread(self.store.list_blueprints, repo)
        return [{"name": name, "repo": repo, **self._blueprint_status(repo, name)} for name in names]

    @inlineCallbacks
    def get_blueprint(self, repo: str, name: str):
        self._repo(repo)
        name = model.blueprint_name(name)
        content = yield threads.deferToThread(self.store.read_blueprint, repo, name)
        return {"name": name, "repo": repo, "content": content, **self._blueprint_status(repo, name)}

    @inlineCallbacks
    def add_blueprint(self, repo: str, name: str, content: Any, create: bool = True):
        """Store a blueprint (new when ``create``, else replacing one); fires its dict."""
        self._repo(repo)
        name = model.blueprint_name(name)
        yield self._lock(repo).acquire()
        try:
            yield threads.deferToThread(self.store.write_blueprint, repo, name, content, create)
            yield self._set_status(repo, name, {"state": "new", "error": None, "executed": None})
        finally:
            self._lock(repo).release()
        return (yield self.get_blueprint(repo, name))

    @inlineCallbacks
    def delete_blueprint(self, repo: str, name: str):
        self._repo(repo)
        name = model.blueprint_name(name)
        yield self._lock(repo).acquire()
        try:
            yield threads.deferToThread(self.store.delete_blueprint, repo, name)
            meta = self._repo(repo).meta
            meta.get("blueprints", {}).pop(name, None)
            yield threads.deferToThread(self.store.write_meta, repo, meta)
        finally:
            self._lock(repo).release()

    def _set_status(self, repo: str, name: str, status: dict[str, Any]) -> Deferred:
        snapshot = self.repos.get(repo)
        if snapshot is None:
            return defer.succeed(None)
        snapshot.meta.setdefault("blueprints", {})[name] = status
        meta = {**snapshot.meta, "blueprints": dict(snapshot.meta["blueprints"])}
        return threads.deferToThread(self.store.write_meta, repo, meta)

    @inlineCallbacks
    def execute_blueprint(self, repo: str, name: str, trig: Optional[dict[str, Any]] = None):
        """Create or update the blueprint's services, then run their installs in file order.

        Fires with (runs started, a Deferred firing with every run once all are recorded).
        A blueprint that fails keeps its error in its status; it is never deleted.
        """
        snapshot = self._repo(repo)
        name = model.blueprint_name(name)
        trig = trig or trigger("blueprint")
        yield self._lock(repo).acquire()
        try:
            content = yield threads.deferToThread(self.store.read_blueprint, repo, name)
            try:
                entries = model.parse_blueprint(content)
                records = model.blueprint_services(repo, name, entries, snapshot.templates, snapshot.services,
                                                   time.time())
            except Invalid as exc:
                yield self._set_status(repo, name, {"state": "error", "error": str(exc), "executed": time.time()})
                raise

            def write() -> None:
                for record in records:
                    self.store.write_service(record)

            yield threads.deferToThread(write)
            for record in records:
                old = snapshot.services.get(record.key)
                if old is not None:  # keep the object the runs in flight hold
                    old.args, old.template, old.updated, old.blueprint = (record.args, record.template,
                                                                          record.updated, record.blueprint)
                else:
                    snapshot.services[record.key] = record
            self._changed()
            yield self._set_status(repo, name, {"state": "running", "error": None, "executed": time.time()})
        finally:
            self._lock(repo).release()
        installs = [record.key for record in records
                    if "install" in snapshot.templates[record.template].actions]
        runs = [Run(repo, key, "install", trig) for key in installs]
        for run in runs:
            self.active[run.id] = run
        finished = self._install_in_order(repo, name, runs)
        return runs, finished

    @inlineCallbacks
    def _install_in_order(self, repo: str, name: str, runs: list[Run]):
        failed: Optional[str] = None
        for run in runs:
            if failed is not None:
                run.state, run.started, run.ended = "error", time.time(), time.time()
                run.log = f"not started: {failed}\n"
                yield self._record(run)
                continue
            try:
                _, d = self._start(repo, run.service, "install", run.trigger, None, run=run)
            except NotFound as exc:
                run.state, run.started, run.ended, run.log = "error", time.time(), time.time(), str(exc) + "\n"
                yield self._record(run)
                failed = f"the install of {run.service} could not start"
                continue
            try:
                done = yield d
            except Exception as exc:  # the pool stopped, or the history could not be written
                failed = f"the install of {run.service} did not complete: {exc}"
                log.warn("blueprint {name} in {repo}: {failed}", name=name, repo=repo, failed=failed)
                break
            if done.state != "ok":
                failed = f"the install of {run.service} ended in {done.state}"
        for run in runs:
            if run.state == "new":  # never started: the cockpit is stopping
                self.active.pop(run.id, None)
        status = {"state": "error" if failed else "ok", "error": failed, "executed": time.time()}
        try:
            yield self._set_status(repo, name, status)
        except Exception as exc:
            log.warn("blueprint {name} in {repo}: cannot record its status: {error}", name=name, repo=repo,
                     error=exc)
        return runs

    # -- services ------------------------------------------------------------
    def list_services(self, repo: str) -> list[dict[str, Any]]:
        snapshot = self._repo(repo)
        return [service.to_dict(snapshot.templates.get(service.template))
                for _, service in sorted(snapshot.services.items())]

    def get_service(self, repo: str, key: str) -> dict[str, Any]:
        service = self._service(repo, key)
        return service.to_dict(self.repos[repo].templates.get(service.template))

    @inlineCallbacks
    def delete_service(self, repo: str, key: str):
        self._service(repo, key)
        yield self._lock(repo).acquire()
        try:
            yield threads.deferToThread(self.store.delete_service, repo, key)
            self.repos[repo].services.pop(key, None)
            self._dirty.discard((repo, key))
            self._changed()
        finally:
            self._lock(repo).release()

    # ------------------------------------------------------------------
    # chat commands
    # ------------------------------------------------------------------
    def _chat_repo(self, args: dict[str, Any]) -> str:
        if args.get("repo"):
            return str(args["repo"])
        if len(self.repos) == 1:
            return next(iter(self.repos))
        raise Invalid("which repository? give it as args.repo; there are: "
                      + (", ".join(sorted(self.repos)) or "none yet"))

    def _find_service(self, args: dict[str, Any]) -> tuple[str, str]:
        key = str(args.get("name") or args.get("service") or "")
        model.split_key(key)
        if args.get("repo"):
            return str(args["repo"]), key
        found = [name for name, repo in self.repos.items() if key in repo.services]
        if len(found) != 1:
            raise NotFound(f"no service {key!r} in any repository" if not found else
                           f"service {key!r} is in several repositories ({', '.join(sorted(found))}); "
                           "give args.repo")
        return found[0], key

    @inlineCallbacks
    def _chat(self, event: TelegramEvent):
        """Do a chat command, answer in the chat, and record it as a run of the robot's own."""
        args = event.args
        action = event.action
        repo = str(args.get("name", "")) if action in ("repo.create", "repo.delete") else str(args.get("repo", ""))
        run = Run(repo, None, action, trigger("telegram", event), state="running", started=time.time())
        try:
            if action == "repo.create":
                yield self.create_repo(str(args.get("name", "")))
                reply = f"Repository {repo} created."
            elif action == "repo.delete":
                yield self.delete_repo(str(args.get("name", "")))
                reply = f"Repository {repo} deleted."
            elif action == "bp.create":
                run.repo = repo = self._chat_repo(args)
                blueprint = yield self.add_blueprint(repo, str(args.get("name", "")), args.get("content"),
                                                     create=not args.get("replace"))
                reply = f"Blueprint {blueprint['name']} stored in {repo}."
            elif action == "bp.execute":
                run.repo = repo = self._chat_repo(args)
                runs, finished = yield self.execute_blueprint(repo, str(args.get("name", "")),
                                                              trigger("telegram", event))
                done = yield finished
                lines = [f"{r.service} install: {r.state}" for r in done]
                reply = f"Blueprint {model.blueprint_name(str(args.get('name', '')))} executed in {repo}." + (
                    "\n" + "\n".join(lines) if lines else " No service has an install action.")
            elif action == "repo.list":
                names = sorted(self.repos)
                reply = ("Repositories:\n" + "\n".join(f"- {name}" for name in names)) if names else \
                    "There is no repository yet. /repo create NAME makes one."
            elif action == "bp.list":
                run.repo = repo = self._chat_repo(args)
                blueprints = yield self.list_blueprints(repo)
                reply = (f"Blueprints in {repo}:\n" + "\n".join(
                    f"- {bp['name']} ({bp['state']})" for bp in blueprints)) if blueprints else \
                    f"There is no blueprint in {repo} yet."
            elif action == "bp.show":
                run.repo = repo = self._chat_repo(args)
                blueprint = yield self.get_blueprint(repo, str(args.get("name", "")))
                error = f"\nLast error: {blueprint['error']}" if blueprint.get("error") else ""
                reply = f"{blueprint['name']} in {repo} ({blueprint['state']}){error}\n{blueprint['content']}"
            elif action == "bp.delete":
                run.repo = repo = self._chat_repo(args)
                name = model.blueprint_name(str(args.get("name", "")))
                yield self.delete_blueprint(repo, name)
                reply = f"Blueprint {name} deleted from {repo}."
            elif action == "service.list":
                run.repo = repo = self._chat_repo(args)
                role = str(args.get("role") or "")
                services = [s for s in self.list_services(repo) if not role or s["role"] == role]
                reply = (f"Services in {repo}:\n" + "\n".join(
                    f"- {s['key']} " + (", ".join(f"{a}: {st}" for a, st in sorted(s["states"].items())
                                                  if st != "new") or "no runs yet")
                    for s in services)) if services else f"There is no service in {repo}" + (
                    f" with the role {role}." if role else " yet.")
            elif action == "service.show":
                repo, key = self._find_service(args)
                run.repo = repo
                service = self.get_service(repo, key)
                template = self.repos[repo].templates.get(service["template"])
                states = ", ".join(f"{a}: {st}" for a, st in sorted(service["states"].items())) or "no runs yet"
                reply = (f"{key} in {repo} (template {service['template']})\nargs: "
                         f"{json.dumps(service['args'], sort_keys=True)}\nstates: {states}\n"
                         f"actions: {', '.join(sorted(template.actions)) if template else 'none'}")
            else:  # service.execute
                repo, key = self._find_service(args)
                run.repo = repo
                _, d = self._start(repo, key, str(args.get("action", "")), trigger("telegram", event),
                                   event.to_dict())
                done = yield d
                reply = f"{key} {done.action}: {done.state}" + (f"\n{done.log[-3000:]}" if done.log else "")
            run.state = "ok"
        except model.AysError as exc:
            run.state, reply = "error", f"{action} failed: {exc}"
        run.ended = time.time()
        run.log = reply + "\n"
        chat_id = args.get("chat_id")
        if chat_id is not None:
            yield self.bus.publish(TelegramEvent(io="output", action="message", source="ays",
                                                 args={"chat_id": chat_id, "msg": reply}))
        else:
            log.info("chat command {action} had no chat_id to answer: {reply}", action=action, reply=reply)
        yield self._record(run)

    # ------------------------------------------------------------------
    # recurring actions, and changes made by other processes
    # ------------------------------------------------------------------
    def _tick(self) -> None:
        # returns nothing: a Deferred would make the timer wait for Redis before its next tick
        try:
            self._fire_recurring()
        except Exception:
            log.failure("recurring actions failed")
        if isinstance(self.bus, RedisBus) and not self._following:
            self._following = True
            d = self._follow_others()
            d.addErrback(lambda f: log.failure("reloading the repositories failed", f))
            d.addBoth(lambda _: setattr(self, "_following", False))

    def _fire_recurring(self) -> None:
        self.subscribers("")  # builds the recurring index too
        now = self.clock.seconds()
        wanted = set()
        for sub, period in self._recurring or []:
            ident = (sub.repo, sub.service, sub.action)
            wanted.add(ident)
            slot = int(now // period)
            last = self._last_slot.get(ident)
            self._last_slot[ident] = slot
            if last is None or slot <= last:
                continue  # fires at period boundaries, the first one after it was seen
            if any(run.service == sub.service and run.action == sub.action and run.repo == sub.repo
                   and run.trigger.get("kind") == "recurring" for run in self.active.values()):
                log.warn("recurring {action} of {service} is still running; this period is skipped",
                         action=sub.action, service=sub.service)
                continue
            self._claim_slot(sub, slot, period).addCallback(self._fire_claimed, sub).addErrback(
                lambda f, sub=sub: log.warn("recurring {action} of {service}: {error}", action=sub.action,
                                            service=sub.service, error=f.getErrorMessage()))
        for ident in set(self._last_slot) - wanted:
            del self._last_slot[ident]

    def _claim_slot(self, sub: Subscription, slot: int, period: float) -> Deferred:
        """Fires True for the one process, of all that share the bus, that runs this period."""
        key = RECURRING_KEY.format(repo=sub.repo, service=sub.service, action=sub.action, slot=slot)
        return self.bus.remember(key, str(os.getpid()), period * 2)

    def _fire_claimed(self, claimed: bool, sub: Subscription) -> Optional[Deferred]:
        if not claimed:
            return None
        try:
            _, d = self._start(sub.repo, sub.service, sub.action, trigger("recurring"), None)
        except NotFound:
            return None
        d.addErrback(lambda f: log.warn("recurring {action} of {service} was not completed: {error}",
                                        action=sub.action, service=sub.service, error=f.getErrorMessage()))
        return None

    @inlineCallbacks
    def _follow_others(self):
        """Reload the repositories when another process changed them (the generation counter moved)."""
        try:
            value = yield self.bus.execute("GET", GENERATION_KEY)
        except Exception:
            return
        value = None if value is None else str(value)
        if not self._generation_read:
            self._generation_read, self._generation = True, value
            return
        if value == self._generation:
            return
        self._generation = value
        loaded = yield threads.deferToThread(self._load_all)
        for name, snapshot in loaded.items():
            old = self.repos.get(name)
            if old is None:
                continue
            for key, service in snapshot.services.items():
                mine = old.services.get(key)
                if mine is not None:  # keep the live objects, which running actions update
                    mine.args, mine.template = service.args, service.template
                    snapshot.services[key] = mine
        self.repos = loaded
        self._changed(bump=False)
        log.info("AYS robot: repositories reloaded after a change made by another cockpit process")
        waiters, self._reload_waiters = self._reload_waiters, []
        for d in waiters:
            d.callback(None)

    def when_reloaded(self) -> Deferred:
        """Fires the next time the robot reloads its repositories because another process changed them."""
        d: Deferred = Deferred(lambda d: self._reload_waiters.remove(d))
        self._reload_waiters.append(d)
        return d
