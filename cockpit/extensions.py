"""The operator's own servers, in the cockpit's process: ``[[servers]]`` (docs/design.md §13).

- ``wsgi = "module:app"``: a WSGI application served by ``twisted.web.wsgi.WSGIResource`` on a
  thread pool of its own, on its own ``listen`` endpoint or mounted on the main site at
  ``/ext/<name>`` (behind ``[api] tokens`` unless ``public``). Its environ carries
  ``cockpit.publish(type, fields) -> guid``, called from the app's thread: the reactor does the
  publishing, and the app's thread waits for it, never the other way round.
- ``service = "module:factory"``: ``factory(context)`` with a :class:`Context`; it returns an
  ``IService`` or any object with ``start()`` and ``stop()``, each of which may return a Deferred.

Extensions are started after the cockpit's own services and stopped before them. An import
that fails, a missing attribute, or a ``start()`` that fails stops start-up with one line that
names the server and exit status 2; a failure later is logged, shown in ``/api/health`` under
``extensions``, and leaves the rest running.
"""
from __future__ import annotations

import importlib
import sys
import threading
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.wsgi import WSGIResource

from cockpit import events
from cockpit.bus import Bus, BusUnavailable
from cockpit.config import Config, ConfigError, ServerSection
from cockpit.events import EventError

log = Logger()

STOP_TIMEOUT = 10.0  # seconds an extension's stop() may take before it is abandoned

__all__ = ["BusUnavailable", "Context", "EventError", "Extension", "ServiceExtension", "WsgiExtension",
           "build_extensions", "check_extensions", "load_target"]


# -- loading -----------------------------------------------------------------------------------------
def add_python_path(cfg: Config) -> None:
    """Put ``[cockpit] python_path`` in front of ``sys.path``, once each."""
    for directory in reversed(cfg.cockpit.python_path):
        if directory not in sys.path:
            sys.path.insert(0, directory)


def load_target(cfg: Config, server: ServerSection) -> Callable[..., Any]:
    """The callable ``server`` names (``module:attr``); ConfigError, in one line naming the server, if not."""
    where = f"{cfg.source}: [[servers]] {server.name}"
    module_name, _, attribute = server.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"{where}: no module named {module_name!r} on [cockpit] python_path "
                              f"({', '.join(cfg.cockpit.python_path) or 'empty'}) or sys.path") from None
        raise ConfigError(f"{where}: importing {module_name} failed: {exc}") from None
    except SyntaxError as exc:
        raise ConfigError(f"{where}: importing {module_name} failed: {exc.msg} "
                          f"({exc.filename}, line {exc.lineno})") from None
    except BaseException as exc:  # whatever the operator's module raises at import, SystemExit included
        raise ConfigError(f"{where}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"{where}: module {module_name} has no attribute {attribute!r}") from None
    if not callable(target):
        kind = type(target).__name__
        raise ConfigError(f"{where}: {server.target} is not callable (it is a{'n' if kind[0] in 'aeiou' else ''} "
                          f"{kind}); it names a WSGI app or a service factory")
    found: Callable[..., Any] = target
    return found


def check_extensions(cfg: Config) -> dict[str, Callable[..., Any]]:
    """Import every ``[[servers]]`` target (start-up's check): name -> callable, or ConfigError."""
    add_python_path(cfg)
    return {server.name: load_target(cfg, server) for server in cfg.servers}


# -- what an extension is given ---------------------------------------------------------------------------
def make_event(event_type: str, fields: Mapping[str, Any], source: str) -> events.Event:
    """A validated event of ``event_type`` from ``fields``; ``source`` unless the fields give one.

    Raises :class:`cockpit.EventError`, whose message names the wrong field.
    """
    if not isinstance(fields, Mapping):
        raise EventError(f"invalid event: the fields are a mapping of names to values, not a {type(fields).__name__}")
    data = dict(fields)
    data.setdefault("source", source)
    return events.from_data(data, event_type)


class Context:
    """What a ``service`` extension is given: ``publish``, ``config``, ``reactor``, ``bus``, ``store``,
    its own ``settings`` table and its ``name``.

    ``publish(type, fields)`` is for the reactor's thread: a Deferred firing with the event's guid,
    or failing with :class:`cockpit.BusUnavailable` or :class:`cockpit.EventError`.
    ``failed(reason)`` tells the cockpit the extension has stopped working: it is logged and
    ``/api/health`` shows it.
    """

    def __init__(self, name: str, config: Config, reactor: Any, bus: Bus, store: Any,
                 settings: Optional[dict[str, Any]] = None,
                 on_failure: Optional[Callable[[str], None]] = None):
        self.name = name
        self.config = config
        self.reactor = reactor
        self.bus = bus
        self.store = store
        self.settings: dict[str, Any] = dict(settings or {})
        self.source = f"ext:{name}"
        self.on_failure = on_failure  # set by the extension the context is for

    def publish(self, event_type: str, fields: Mapping[str, Any]) -> Deferred[Any]:
        try:
            event = make_event(event_type, fields, self.source)
        except EventError as exc:
            return defer.fail(exc)
        return self.bus.publish(event).addCallback(lambda _: event.guid)

    def failed(self, reason: Union[str, BaseException, Failure]) -> None:
        if self.on_failure is not None:
            self.on_failure(_one_line(reason))


def _one_line(reason: Union[str, BaseException, Failure]) -> str:
    """The last line of what went wrong: an exception as ``Type: message``."""
    if isinstance(reason, Failure):
        reason = reason.value
    if isinstance(reason, BaseException):
        lines = str(reason).strip().splitlines()
        return f"{type(reason).__name__}: {lines[-1]}" if lines else type(reason).__name__
    lines = reason.strip().splitlines()
    return lines[-1] if lines else "failed"


# -- the two kinds -------------------------------------------------------------------------------------
class Extension(MultiService):
    """One ``[[servers]]`` entry in the service tree; ``health()`` is its line in /api/health."""

    kind = "abstract"

    def __init__(self, server: ServerSection, reactor: Any):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.server = server
        self.reactor = reactor
        self.state = "stopped"
        self.error: Optional[str] = None
        self.setName(f"ext:{server.name}")  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "state": self.state, "error": self.error}

    def failed(self, reason: str) -> None:
        """It stopped working after start-up: logged, shown in health, and the rest goes on."""
        self.state, self.error = "failed", reason
        log.error("extension {name} failed: {error}; the rest of the cockpit goes on", name=self.server.name,
                  error=reason)


class WsgiExtension(Extension):
    """A WSGI app on a thread pool of its own; ``resource`` is what serves it."""

    kind = "wsgi"

    def __init__(self, server: ServerSection, app: Callable[..., Any], context: Context, reactor: Any,
                 site_factory: Optional[Callable[[Any], Any]] = None):
        super().__init__(server, reactor)
        self.app = app
        self.context = context
        self.pool = ThreadPool(minthreads=0, maxthreads=server.threads, name=f"cockpit-ext-{server.name}")
        self.resource = WSGIResource(reactor, self.pool, self._serve)
        self.errors = 0  # exceptions the app let out, each answered 500 by twisted.web
        if server.listen is not None:
            from cockpit.listener import Listener

            assert site_factory is not None, "an app on its own endpoint needs a site"
            Listener(f"{server.name} extension", server.listen, site_factory(self.resource), reactor,  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
                     scheme="http").setServiceParent(self)

    def _serve(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["cockpit.publish"] = self.publish
        try:
            result: Iterable[bytes] = self.app(environ, start_response)
            return result
        except Exception as exc:
            self.errors += 1
            self.error = _one_line(exc)
            raise  # twisted.web logs it with its traceback and answers 500

    def publish(self, event_type: str, fields: Mapping[str, Any]) -> str:
        """``environ["cockpit.publish"]``: publish from the app's thread; the event's guid.

        Raises :class:`cockpit.BusUnavailable` when the bus cannot take it (answer 503), and
        :class:`cockpit.EventError` naming the field of a bad event (answer 400).
        """
        if isInIOThread():
            raise RuntimeError("cockpit.publish waits for the reactor: call it from the app's thread, "
                               "not the reactor's")
        return str(blockingCallFromThread(self.reactor, self.context.publish, event_type, fields))

    def startService(self) -> None:
        self.pool.start()
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.state = "running"
        where = (f"mounted at {self.server.mount}" + (" (public)" if self.server.public else " (behind [api] tokens)")
                 if self.server.mount is not None else f"on {self.server.listen}")
        log.info("extension {name}: WSGI app {target} {where}, {threads} threads", name=self.server.name,
                 target=self.server.target, where=where, threads=self.server.threads)

    def stopService(self) -> Deferred[Any]:
        self.state = "stopped"
        listening = defer.maybeDeferred(super().stopService)
        return listening.addBoth(lambda _: _bounded(self.reactor, _stop_pool(self.reactor, self.pool),
                                                    self.server.name))


def _stop_pool(reactor: Any, pool: ThreadPool) -> Deferred[Any]:
    """``pool.stop()`` joins its threads: done in a thread of its own, so a stuck handler holds no one."""
    done: Deferred[Any] = Deferred()

    def stop() -> None:
        pool.stop()
        reactor.callFromThread(done.callback, None)

    threading.Thread(target=stop, name=f"{pool.name}-stop", daemon=True).start()
    return done


def _bounded(reactor: Any, d: Deferred[Any], name: str) -> Deferred[Any]:
    """``d``, given up after STOP_TIMEOUT seconds with a line in the log; never fails."""
    timer = reactor.callLater(STOP_TIMEOUT, d.cancel)

    def ended(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                log.warn("extension {name} had not stopped after {seconds:.0f}s: left as it is",
                         name=name, seconds=STOP_TIMEOUT)
            else:
                log.failure("extension {name} failed to stop", result, name=name)
        return None

    return d.addBoth(ended)


class ServiceExtension(Extension):
    """What ``factory(context)`` returned, started after the cockpit's services and stopped before them."""

    kind = "service"

    def __init__(self, server: ServerSection, factory: Callable[..., Any], context: Context, reactor: Any,
                 on_start_failure: Callable[[str], None]):
        super().__init__(server, reactor)
        self.factory = factory
        self.context = context
        self.on_start_failure = on_start_failure
        self.made: Any = None
        self.started: Deferred[Any] = Deferred()  # fires once its start() has, or with its failure

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.state = "starting"
        d = defer.maybeDeferred(self._start)
        d.addCallbacks(self._running, self._start_failed)

    def _start(self) -> Any:
        made = self.factory(self.context)
        if IService.providedBy(made):
            self.made = made
            return made.startService()
        if callable(getattr(made, "start", None)) and callable(getattr(made, "stop", None)):
            self.made = made
            return made.start()
        raise TypeError(f"{self.server.target} returned a {type(made).__name__}: neither an IService nor an "
                        "object with start() and stop()")

    def _running(self, _: Any) -> None:
        if self.state == "starting":
            self.state = "running"
            log.info("extension {name}: service {target} started", name=self.server.name, target=self.server.target)
        self.started.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        self.state, self.error = "failed", _one_line(failure)
        log.failure("extension {name} failed to start", failure, name=self.server.name)
        self.started.errback(failure)
        self.started.addErrback(lambda _: None)
        self.made = None  # nothing to stop
        self.on_start_failure(f"{self.context.config.source}: [[servers]] {self.server.name}: start() failed: "
                              f"{self.error}")

    def stopService(self) -> Deferred[Any]:
        made, self.made = self.made, None
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self.state != "failed":
            self.state = "stopped"
        if made is None:
            return defer.succeed(None)
        stop = made.stopService if IService.providedBy(made) else made.stop
        return _bounded(self.reactor, defer.maybeDeferred(stop), self.server.name)


class Mounts(Resource):
    """The main site's root: ``/ext/<name>/...`` goes to that mounted app, everything else to ``api``.

    ``authenticate(request)`` raises for a request without a good token; ``refuse(request, exc)``
    renders that refusal. A public mount skips them.
    """

    def __init__(self, api: Any, apps: dict[str, tuple[Resource, bool]], authenticate: Callable[[Request], None],
                 refuse: Callable[[Request, Exception], bytes]):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.api = api
        self.apps = {name.encode(): entry for name, entry in apps.items()}
        self.authenticate = authenticate
        self.refuse = refuse

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        postpath: list[bytes] = request.postpath or []
        if path == b"ext" and postpath and postpath[0] in self.apps:
            resource, public = self.apps[postpath[0]]
            request.prepath = (request.prepath or []) + [postpath.pop(0)]
            if not public:
                try:
                    self.authenticate(request)
                except Exception as exc:
                    return _Refusal(self.refuse, exc)
            return resource
        # not an extension: the API sees the whole path, as if this root were not here
        postpath.insert(0, path)
        if request.prepath:
            request.prepath.pop()
        return self.api


class _Refusal(Resource):
    isLeaf = True

    def __init__(self, refuse: Callable[[Request, Exception], bytes], exc: Exception):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self._refuse, self._exc = refuse, exc

    def render(self, request: Request) -> bytes:
        return self._refuse(request, self._exc)


def build_extensions(cfg: Config, targets: dict[str, Callable[..., Any]], reactor: Any, bus: Bus, store: Any,
                     site_factory: Callable[[Any], Any],
                     on_start_failure: Callable[[str], None]) -> list[Extension]:
    """One service per ``[[servers]]`` entry, in the config's order."""
    built: list[Extension] = []
    for server in cfg.servers:
        context = Context(server.name, cfg, reactor, bus, store, server.settings)
        extension: Extension
        if server.kind == "wsgi":
            extension = WsgiExtension(server, targets[server.name], context, reactor, site_factory)
        else:
            extension = ServiceExtension(server, targets[server.name], context, reactor, on_start_failure)
        context.on_failure = extension.failed
        built.append(extension)
    return built
