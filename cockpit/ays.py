"""The AYS robot: events in, action runs out.

It consumes every ``ckpt.<type>`` stream with the group ``ays``. For each event it runs
the subscribed actions (``events.<type>`` in a template's ``service.hrd``) of every
service, with the event as payload, in the worker pool. Before it handles what it read,
its catalog is brought up to every change made before the read (:meth:`Catalog.sync`). The
entry is acknowledged only when all those runs are recorded in the run history; on
redelivery a run already recorded for (event guid, service, action) is not run again.
Chat commands are done by :mod:`cockpit.ays_chat`, recurring actions fired by
:mod:`cockpit.ays_recurring`; the repositories, templates, blueprints and services are the
catalog's (:mod:`cockpit.ays_catalog`).

The methods the REST API calls (execute_blueprint, run_action, runs) return Deferreds or
raise the errors of :mod:`cockpit.repos` (NotFound, Conflict, Invalid).
"""
from __future__ import annotations

from typing import Any, Callable, Generator, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit import repos as model
from cockpit.ays_catalog import Catalog, Subscription
from cockpit.ays_chat import CHAT_ACTIONS, ChatWork
from cockpit.ays_recurring import RecurringActions
from cockpit.bus import AYS_GROUP, Bus, Delivery
from cockpit.deferreds import settled
from cockpit.events import Event, GenericEvent, TelegramEvent, from_data
from cockpit.metrics import NO_METRICS
from cockpit.repos import NotFound
from cockpit.runs import DONE_STATES, Run, RunHistory, new_run_id
from cockpit.workers import Outcome, WorkerPool

log = Logger()

READ_LINGER = 0.004  # seconds

__all__ = ["Robot", "Subscription", "trigger", "CHAT_ACTIONS"]


def trigger(kind: str, event: Optional[Event] = None) -> dict[str, Any]:
    return {"kind": kind, "event_type": event.type if event is not None else None,
            "event_guid": event.guid if event is not None else None}


class Robot(Service):
    """The AYS robot; it starts and stops its run history and worker pool itself, in the right order.

    ``catalog`` is the process's Catalog (started before the robot and stopped after it), or a
    repositories directory: the robot then keeps an embedded catalog of its own there.
    """

    metrics: Any = NO_METRICS  # cockpit.metrics: each recorded run is counted

    def __init__(self, catalog: Catalog, bus: Bus, history: RunHistory, pool: WorkerPool, *,
                 clock: IReactorTime, tick: float = 1.0, concurrency: int = 256, mailer: Any = None):
        self._own_catalog = False  # a catalog not yet started when the robot starts is the robot's to run
        self.catalog = catalog
        self.bus = bus
        self.history = history
        self.pool = pool
        pool.emit = self._publish_emitted
        if mailer is not None:
            pool.send_mail = lambda data: self._send_mail(mailer, data)
        self.clock = clock
        self.tick = tick
        self.concurrency = concurrency
        self.active: dict[str, Run] = {}
        self.executing: dict[tuple[str, str], Deferred[list[Run]]] = {}  # (repo, blueprint) -> its status recorded
        self._running_keys: dict[tuple[Any, ...], Deferred[Run]] = {}
        self.chat = ChatWork(self)
        self.recurring = RecurringActions(catalog, bus, clock, self._start_recurring, self._recurring_busy, tick)
        self.consumer: Any = None
        self.ready: Deferred[None] = Deferred()
        self._run_waiters: list[tuple[Callable[[Run], bool], Deferred[Run]]] = []

    # ------------------------------------------------------------------
    # lifetime
    # ------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.history.startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.pool.startService()
        if not self.catalog.running:
            self._own_catalog = True
            self.catalog.startService()
        self.catalog.ready.addCallbacks(self._catalog_ready, lambda f: None)

    def _catalog_ready(self, _: Any) -> None:
        if not self.running or self.ready.called:
            return
        log.info("AYS robot: {workers} workers, {repos} repositories", workers=self.pool.size,
                 repos=len(self.catalog.repos))
        # a few milliseconds of linger between reads that came back short: under load the robot
        # reads and acknowledges in batches, at a cost to latency well inside its 20 ms goal
        linger: dict[str, Any] = {"linger": READ_LINGER} if self.bus.remote else {}
        self.consumer = self.bus.consumer(AYS_GROUP, self.handle_event, concurrency=self.concurrency,
                                          drain_timeout=min(self.pool.action_timeout + 1.0, 10.0),
                                          before_dispatch=self.catalog.sync, **linger)
        self.consumer.startService()
        self.recurring.startService()
        self.ready.callback(None)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self.recurring.running:
            yield self.recurring.stopService()
        if self.consumer is not None:
            yield self.consumer.stopService()  # lets running events finish and be acknowledged
        yield self.pool.stopService()
        yield self.history.stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self._own_catalog:
            yield self.catalog.stopService()  # writes the states still pending
        # nothing more will start or be recorded
        for _, d in list(self._run_waiters):
            d.cancel()

    def health(self) -> dict[str, Any]:
        """ok while running with a pool that works and a catalog that loads."""
        pool, catalog = self.pool.health(), self.catalog.health()
        return {"ok": self.running and pool["ok"] and catalog["ok"], "loaded": self.ready.called,
                "repos": len(self.catalog.repos), "active_runs": len(self.active), "workers": pool,
                "catalog": catalog}

    # ------------------------------------------------------------------
    # events
    # ------------------------------------------------------------------
    def handle_event(self, event: Event, delivery: Optional[Delivery] = None) -> Optional[Deferred[list[Any]]]:
        """Run everything ``event`` asks for; fires once every run it caused is recorded.

        None when the event asks for nothing: the consumer acknowledges it at once.
        """
        targets = self.catalog.subscribers(event.type)
        chat = (isinstance(event, TelegramEvent) and event.io == "input" and event.action in CHAT_ACTIONS)
        if not targets and not chat:
            return None
        return self.history.completed(event.guid).addCallback(self._handle_new, event, targets, chat)

    def _handle_new(self, done: set[tuple[str, str, str]], event: Event, targets: list[Subscription],
                    chat: bool) -> Deferred[list[Any]]:
        work: list[Deferred[Any]] = []
        payload = None
        for sub in targets:
            if (sub.repo, sub.service, sub.action) in done:
                continue  # a redelivery: this run already happened and was recorded
            if payload is None:
                payload = event.to_dict()
            work.append(self._event_run(sub, event, payload))
        if chat:
            assert isinstance(event, TelegramEvent)  # handle_event chats only for Telegram input
            if not any(service == "" and action == event.action for _, service, action in done):
                work.append(self.chat.handle(event, trigger("telegram", event)))
        return defer.gatherResults(work, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def _event_run(self, sub: Subscription, event: Event, payload: dict[str, Any]) -> Deferred[Any]:
        key = (event.guid, sub.repo, sub.service, sub.action)
        running = self._running_keys.get(key)
        if running is not None:  # the same event delivered twice at once: wait for the first
            return settled(running)
        try:
            _, d = self.start_run(sub.repo, sub.service, sub.action, trigger("event", event), payload)
        except NotFound:
            return defer.succeed(None)  # the service went away since the index was built
        self._running_keys[key] = d
        d.addBoth(lambda result: (self._running_keys.pop(key, None), result)[1])
        return d

    def _publish_emitted(self, data: dict[str, Any]) -> Deferred[Any]:
        return defer.maybeDeferred(from_data, data).addCallback(self.bus.publish)

    @staticmethod
    def _send_mail(mailer: Any, data: dict[str, Any]) -> Deferred[Any]:
        from cockpit.smtp import OutgoingMail

        return defer.maybeDeferred(lambda: mailer.send(OutgoingMail.model_validate(data)))

    # ------------------------------------------------------------------
    # runs
    # ------------------------------------------------------------------
    def start_run(self, repo: str, key: str, action: str, trig: dict[str, Any],
                  event: Optional[dict[str, Any]], run: Optional[Run] = None) -> tuple[Run, Deferred[Run]]:
        """Queue a run (``run``, or a new one); returns it and a Deferred firing with it once recorded."""
        service = self.catalog.service(repo, key)
        template = self.catalog.template_of(service)
        if template is None:
            raise NotFound(f"service {key!r} has no loaded template {service.template!r}")
        if action not in template.actions:
            raise NotFound(f"template {template.name!r} has no action {action!r}; it has "
                           + (", ".join(template.actions) or "none"))
        if run is None:
            run = Run(repo, key, action, trig, new_run_id(self.clock.seconds()))
        self.active[run.id] = run
        job = {"id": run.id, "path": str(template.actions_file), "action": action, "event": event,
               "service": {"key": key, "role": service.role, "instance": service.instance, "repo": repo,
                           "template": service.template, "args": service.args}}

        def started() -> None:
            run.state, run.started = "running", self.clock.seconds()
            self._set_state(run)
            self.history.started(run)  # shown as running by every process that shares the history
            self._offer(run)

        d = self.pool.submit(job, on_start=started).addCallbacks(
            self._completed, self._not_run, callbackArgs=(run,), errbackArgs=(run,))
        return run, d

    def _set_state(self, run: Run) -> None:
        state = run.state
        assert run.service is not None  # a run of start_run's, which is a service's
        d = self.catalog.set_state(run.repo, run.service, run.action, state)
        d.addErrback(lambda f: log.warn("the state {state} of {action} of {service} in {repo} was not stored: "
                                        "{error}", state=state, action=run.action, service=run.service,
                                        repo=run.repo, error=f.getErrorMessage()))

    def _completed(self, outcome: Outcome, run: Run) -> Deferred[Run]:
        now = self.clock.seconds()
        run.state = outcome.state
        run.started = run.started or now
        run.ended = now
        run.log, run.result = outcome.log, outcome.result
        if run.state != "ok":
            lines = [line for line in (run.log or "").splitlines() if line.strip()]
            log.warn("run {id}: {action} of {service} in {repo} ended in {state}: {error}", id=run.id,
                     action=run.action, service=run.service, repo=run.repo, state=run.state,
                     error=lines[-1][:500] if lines else "no output")
        self._set_state(run)
        return self.record(run)

    def record(self, run: Run) -> Deferred[Run]:
        """Write ``run`` to the history; fires with it once recorded (and offers it to the waiters)."""
        self.metrics.run(run.state, run.ended - run.started if run.ended and run.started else None)
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
                   trig: Optional[dict[str, Any]] = None, event: Optional[Event] = None) -> tuple[Run, Deferred[Run]]:
        """Start an action by hand (REST, chat); the event it gets is ``event`` or a generic one with ``args``."""
        if event is None:
            event = GenericEvent(source="rest", tags=["action"], args=args or {}, epoch=int(self.clock.seconds()))
        run, d = self.start_run(repo, key, action, trig or trigger("rest"), event.to_dict())
        d.addErrback(lambda f: log.warn("run {id} was not completed: {error}", id=run.id,
                                        error=f.getErrorMessage()))
        return run, d

    # -- recurring ------------------------------------------------------------
    def _start_recurring(self, sub: Subscription) -> Deferred[Run]:
        return self.start_run(sub.repo, sub.service, sub.action, trigger("recurring"), None)[1]

    def _recurring_busy(self, sub: Subscription) -> bool:
        return any(run.service == sub.service and run.action == sub.action and run.repo == sub.repo
                   and run.trigger.get("kind") == "recurring" for run in self.active.values())

    # -- waiting for runs ------------------------------------------------------
    def when_run(self, predicate: Callable[[Run], bool]) -> Deferred[Run]:
        """Fires with the first run from now on that ``predicate`` accepts.

        A run is offered as it starts in a worker (state ``running``) and once it is recorded
        (``ok``, ``error`` or ``timeout``); what the robot does itself (chat commands) and installs
        that never start are offered once recorded only. Cancelled when the robot stops.
        """
        d: Deferred[Run] = Deferred(lambda d: self._run_waiters.remove((predicate, d)))
        self._run_waiters.append((predicate, d))
        return d

    def when_recorded(self, run_id: str) -> Deferred[Run]:
        """Fires with the Run once it is recorded (at once if it already is); NotFound if there is no such run."""
        if run_id in self.active:  # it leaves ``active`` when it is recorded, and is offered right then
            return self.when_run(lambda run: run.id == run_id and run.state in DONE_STATES)

        def found(run: Optional[Run]) -> Run:
            if run is None:
                raise NotFound(f"no run {run_id!r}")
            if run.state not in DONE_STATES:  # going on in another process: not this robot's to wait for
                raise NotFound(f"run {run_id!r} is still going in another cockpit process")
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

    def get_run(self, run_id: str) -> Deferred[dict[str, Any]]:
        """Fires with the run (running or recorded) as a dict; NotFound otherwise."""
        active = self.active.get(run_id)
        if active is not None:
            return defer.succeed(active.to_dict())

        def found(run: Optional[Run]) -> dict[str, Any]:
            if run is None:
                raise NotFound(f"no run {run_id!r}")
            return run.to_dict()

        return self.history.get(run_id).addCallback(found)

    def list_runs(self, limit: int = 50, before: Optional[str] = None,
                  **filters: Optional[str]) -> Deferred[list[dict[str, Any]]]:
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
    # blueprints
    # ------------------------------------------------------------------
    @inlineCallbacks
    def execute_blueprint(self, repo: str, name: str, trig: Optional[dict[str, Any]] = None
                          ) -> Generator[Deferred[Any], Any, tuple[list[Run], Deferred[list[Run]]]]:
        """Create or update the blueprint's services, then run their installs in file order.

        Fires with (runs started, a Deferred firing with every run once all are recorded).
        A blueprint that fails keeps its error in its status; it is never deleted.
        """
        name = model.blueprint_name(name)
        trig = trig or trigger("blueprint")
        records = yield self.catalog.prepare_blueprint(repo, name)
        installs = []
        for record in records:
            template = self.catalog.template_of(record)
            if template is not None and "install" in template.actions:
                installs.append(record.key)
        runs = [Run(repo, key, "install", trig, new_run_id(self.clock.seconds())) for key in installs]
        for run in runs:
            self.active[run.id] = run
        finished = self._install_in_order(repo, name, runs)
        self.executing[(repo, name)] = finished
        finished.addBoth(self._executed, repo, name, finished)
        return runs, finished

    def _executed(self, result: Any, repo: str, name: str, finished: Deferred[list[Run]]) -> Any:
        if self.executing.get((repo, name)) is finished:
            del self.executing[(repo, name)]
        return result

    def when_executed(self, repo: str, name: str) -> Deferred[None]:
        """Fires once the blueprint's execution going on in this process has recorded its status."""
        return settled(self.executing.get((repo, model.blueprint_name(name))))

    @inlineCallbacks
    def _install_in_order(self, repo: str, name: str, runs: list[Run]) -> Generator[Deferred[Any], Any, list[Run]]:
        failed: Optional[str] = None
        for run in runs:
            if failed is not None:
                run.state = "error"
                run.started = run.ended = self.clock.seconds()
                run.log = f"not started: {failed}\n"
                yield self.record(run)
                continue
            assert run.service is not None  # execute_blueprint's runs are its services' installs
            try:
                _, d = self.start_run(repo, run.service, "install", run.trigger, None, run=run)
            except NotFound as exc:
                run.state, run.log = "error", str(exc) + "\n"
                run.started = run.ended = self.clock.seconds()
                yield self.record(run)
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
        status = {"state": "error" if failed else "ok", "error": failed, "executed": self.clock.seconds()}
        try:
            yield self.catalog.set_blueprint_status(repo, name, status)
        except Exception as exc:
            log.warn("blueprint {name} in {repo}: cannot record its status: {error}", name=name, repo=repo,
                     error=exc)
        return runs

    # -- the catalog's writes, for callers that hold the robot -----------------------------
    def create_repo(self, name: str) -> Deferred[Any]:
        return self.catalog.create_repo(name)

    def put_template(self, repo: str, name: str, files: Any) -> Deferred[Any]:
        return self.catalog.put_template(repo, name, files)

    def add_blueprint(self, repo: str, name: str, content: Any, create: bool = True) -> Deferred[Any]:
        return self.catalog.add_blueprint(repo, name, content, create)
