"""``twistd cockpit``: options and the service tree."""
from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import IO, Any, Callable, Generator, Optional

from twisted.application.service import MultiService, Service
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python import usage

from cockpit import __version__, config as config_module
from cockpit.backends import make_backend
from cockpit.config import Config, ConfigError
from cockpit.listener import Listener, check_endpoint

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Runs the cockpit: REST API and dashboard, SMTP server, Telegram bot and the AYS robot, "
                "in one process. With no --config it runs on embedded defaults "
                "(API on 127.0.0.1:8080, SMTP on 127.0.0.1:2525, in-process bus). "
                "For JSON-lines logs, run twistd with --logger cockpit.logs.json_observer.")
    optParameters = [["config", "c", None, "TOML config file (see config.example.toml)."]]

    def opt_version(self) -> None:
        """Print the cockpit's version and exit."""
        sys.stdout.write(f"cockpit {__version__}\n")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            cfg = config_module.load(self["config"])
            for section, spec in (("api", cfg.api.endpoint()), ("mail", cfg.mail.endpoint())):
                try:
                    check_endpoint(spec)
                except ValueError as exc:
                    raise ConfigError(f"{cfg.source}: [{section}] listen: {exc}") from None
            for server in cfg.servers:
                if server.listen is not None:
                    try:
                        check_endpoint(server.listen)
                    except ValueError as exc:
                        raise ConfigError(f"{cfg.source}: [[servers]] {server.name} listen: {exc}") from None
            if cfg.notify.mail_to and cfg.mail.relay is None:
                raise ConfigError(f"{cfg.source}: [notify] mail_to: notices by mail need a [mail.relay]")
            check_data_dir(cfg)
            from cockpit.extensions import check_extensions

            self.extension_targets = check_extensions(cfg)  # imported here: a module that fails says so now
        except ConfigError as exc:
            # one line and a non-zero exit; twistd would print its whole usage for a UsageError
            sys.stderr.write(f"cockpit: {exc}\n")
            raise SystemExit(2)
        self.cockpit_config = cfg


def check_data_dir(cfg: Config) -> None:
    """Create ``data_dir`` and write and remove a file in it, so one that cannot be used stops start-up.

    Otherwise the first mail with an attachment, or the first run, would find out, long after start-up.
    """
    path = cfg.data_dir
    probe = path / f".cockpit-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in (str(path), str(probe)) else ""
        raise ConfigError(f"{cfg.source}: [cockpit] data_dir: {path} cannot be created and written: "
                          f"{reason}{where}") from None


def default_log_observer(twistd_options: Any, out: IO[str] = sys.stdout) -> Optional[ILogObserver]:
    """What a plain ``twistd -n cockpit`` logs through: twistd's own text lines on stdout, without the
    reconnection attempts (:func:`cockpit.logs.text_observer`). None where twistd was told how to log
    (``--logger``, ``--syslog``, ``--logfile``, or running as a daemon): that choice stands."""
    if twistd_options is None or not twistd_options.get("nodaemon"):
        return None
    if twistd_options.get("logger") or twistd_options.get("syslog") or twistd_options.get("logfile") not in (None, "-"):
        return None
    from cockpit.logs import text_observer

    return text_observer(out)


class ServiceTree(MultiService):
    """Services started in the order they were added and stopped in reverse, one at a time.

    Twisted's MultiService stops its services all at once: the bus, started first, would close
    while the consumers still drain. Here each service stops once the one after it has stopped.

    ``log_observer``, when set, is offered to the twistd application the tree joins: twistd logs
    through an application's observer when it was given no ``--logger``.
    """

    log_observer: Optional[ILogObserver] = None

    def setServiceParent(self, parent: Any) -> None:
        # getComponent, setComponent and setServiceParent are Twisted's own, unannotated
        if self.log_observer is not None and isinstance(parent, Componentized) \
                and parent.getComponent(ILogObserver) is None:  # type: ignore[no-untyped-call]
            parent.setComponent(ILogObserver, self.log_observer)  # type: ignore[no-untyped-call]
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield defer.maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=service.name or repr(service))


class StartupFailure:
    """Stops start-up from the reactor's thread: one line on stderr, the services stopped as at a
    SIGTERM, then exit status 2 (twistd itself would exit 0 once its reactor has stopped)."""

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.status: Optional[int] = None

    def __call__(self, line: str) -> None:
        if self.status is not None:
            return
        self.status = 2
        err = sys.__stderr__ or sys.stderr  # twistd has made sys.stderr a logger by now
        err.write(f"cockpit: {line}\n")
        err.flush()
        atexit.register(self._exit)  # after twistd has stopped the services, logged and removed its pidfile
        self.reactor.callLater(0, self.reactor.stop)

    def _exit(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.status or 0)


class CleanExit(Service):
    """SIGTERM is how systemd asks for a stop: shut down and exit 0, not 128+15."""

    def __init__(self, reactor: Any):
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        # after the reactor has put in its own handlers, which would re-raise the signal at exit
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, *_: Any) -> None:
        log.info("received SIGTERM, shutting down")
        self.reactor.callFromThread(self.reactor.stop)


def makeService(options: Any, reactor: Any = None) -> ServiceTree:
    cfg: Config = getattr(options, "cockpit_config", None) or config_module.load(options["config"])
    if reactor is None:
        from twisted.internet import reactor
    top = build(cfg, reactor, getattr(options, "extension_targets", None), StartupFailure(reactor))
    CleanExit(reactor).setServiceParent(top)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
    top.log_observer = default_log_observer(getattr(options, "parent", None))
    return top


def _inflight(part: Any) -> int:
    """Entries ``part``'s bus consumer holds unacknowledged (0 before it has one)."""
    consumer = getattr(part, "consumer", None)
    return len(consumer.inflight) if consumer is not None else 0


def build(cfg: Config, reactor: Any = None, extension_targets: Optional[dict[str, Callable[..., Any]]] = None,
          on_start_failure: Optional[Callable[[str], None]] = None) -> ServiceTree:
    """Wire the service tree for ``cfg``; nothing else happens here."""
    if reactor is None:
        from twisted.internet import reactor
    # ServiceTree() and the services' setName and setServiceParent, below, are Twisted's own, unannotated
    top = ServiceTree()  # type: ignore[no-untyped-call]
    backend = make_backend(cfg, reactor)  # Redis or embedded: chosen here, once
    bus = backend.bus
    bus.setName("bus")  # type: ignore[no-untyped-call]
    # first in, so it is stopped last, once every consumer has left
    bus.setServiceParent(top)  # type: ignore[no-untyped-call]

    from cockpit.smtp import IncomingMailFactory, MailSender
    from cockpit.store import Store
    from cockpit.web import Api, ApiSite

    store = Store(cfg.data_dir / "store", cfg.public_url, reactor)
    mailer = None
    if cfg.mail.relay is not None:
        # outgoing mail is stored in Redis, or under data_dir with the embedded bus, before it is accepted
        mailer = MailSender(cfg.mail.relay, reactor, hostname=cfg.mail.hostname,
                            outbox=backend.outbox())
        mailer.setName("mailer")  # type: ignore[no-untyped-call]
        mailer.setServiceParent(top)  # type: ignore[no-untyped-call]
    parsers = None
    if cfg.mail.parsers:
        from cockpit.parse_pool import ParserPool

        # before the listener, so that it stops after it
        parsers = ParserPool(cfg.mail.parsers, store.root, cfg.public_url, cfg.mail.parse_timeout, reactor)
        parsers.setName("mail-parsers")  # type: ignore[no-untyped-call]
        parsers.setServiceParent(top)  # type: ignore[no-untyped-call]
    smtp_factory = IncomingMailFactory(cfg.mail, bus, store, reactor, parsers=parsers)
    smtp_listener = Listener("SMTP", cfg.mail.endpoint(), smtp_factory, reactor)
    smtp_listener.setName("smtp")  # type: ignore[no-untyped-call]
    smtp_listener.setServiceParent(top)  # type: ignore[no-untyped-call]

    from cockpit.groups import EventGroups

    groups = EventGroups(bus, backend.group_store(reactor, cfg.groups.samples), reactor, cfg.groups.keep_days)
    groups.setName("groups")  # type: ignore[no-untyped-call]
    groups.setServiceParent(top)  # type: ignore[no-untyped-call]
    from cockpit.heartbeats import Heartbeats, HeartbeatsApi

    heartbeats = Heartbeats(backend.heartbeats(reactor), bus, reactor)  # checked once across the cluster
    heartbeats.setName("heartbeats")  # type: ignore[no-untyped-call]
    heartbeats.setServiceParent(top)  # type: ignore[no-untyped-call]
    from cockpit.alertmanager import AlertmanagerApi
    from cockpit.ays import Robot
    from cockpit.ays_api import AysApi
    from cockpit.ays_catalog import Catalog
    from cockpit.workers import WorkerPool

    # before the robot, so that it is stopped after it (and writes the states the robot's last runs set)
    catalog = Catalog(backend.catalog_store(cfg.repos_dir, cfg.data_dir, reactor), reactor)
    catalog.setName("ays-catalog")  # type: ignore[no-untyped-call]
    catalog.setServiceParent(top)  # type: ignore[no-untyped-call]
    history = backend.run_history(reactor, cfg.ays.keep_days, cfg.ays.keep_runs)  # shared on Redis
    pool = WorkerPool(cfg.ays.workers, cfg.ays.action_timeout, reactor, action_memory=cfg.ays.action_memory)
    robot = Robot(catalog, bus, history, pool, clock=reactor, mailer=mailer)
    robot.setName("ays")  # type: ignore[no-untyped-call]
    robot.setServiceParent(top)  # type: ignore[no-untyped-call]

    from cockpit.silences import SilencesApi

    silences = backend.silences(reactor)  # shared: what holds back the notices
    bot = None
    if cfg.bot.token:
        from cockpit.telegram import TelegramBot

        bot = TelegramBot(cfg, backend, reactor, catalog=catalog, groups=groups.store, silences=silences)
        bot.setName("telegram")  # type: ignore[no-untyped-call]
        bot.setServiceParent(top)  # type: ignore[no-untyped-call]

    from cockpit.notices import MailChannel, Notifier

    channels: list[Any] = []
    if bot is not None and cfg.bot.notify_chats:
        channels.append(bot.notices)
    if cfg.notify.mail_to and mailer is not None:  # without a relay, start-up has stopped already
        channels.append(MailChannel(mailer, cfg.notify.mail_to))
    notifier = None
    if channels:  # with nowhere to send them, notices stay due and ecos stay NEW
        notifier = Notifier(groups.store, channels, reactor, cfg.notify.repeat, silences=silences)
        notifier.setName("notices")  # type: ignore[no-untyped-call]
        notifier.setServiceParent(top)  # type: ignore[no-untyped-call]

    from functools import partial

    from cockpit.health import run_history_health, store_health, telegram_health

    services: dict[str, Callable[[], dict[str, Any]]] = {
        "groups": groups.health, "ays": robot.health, "run_history": partial(run_history_health, history),
        "store": partial(store_health, store)}
    if notifier is not None:
        services["notices"] = notifier.health
    services["heartbeats"] = heartbeats.health
    if bot is not None:
        services["telegram"] = partial(telegram_health, bot)
    if mailer is not None:
        services["mailer"] = mailer.health
    if parsers is not None:
        services["mail_parsers"] = parsers.health
    from cockpit.metrics import Metrics

    # what this process's consumers hold unacknowledged: read from memory, so a scrape costs no round trip
    metrics = Metrics(pending={"groups": lambda: _inflight(groups), "ays": lambda: _inflight(robot)})
    bus.metrics = smtp_factory.metrics = robot.metrics = metrics
    api = Api(cfg, bus, store=store, mailer=mailer, services=services, groups=groups, clock=reactor,
              metrics=metrics)
    api.include(AysApi(robot, catalog))
    api.include(AlertmanagerApi(bus))
    api.include(HeartbeatsApi(heartbeats))
    from cockpit.sentry import SentryApi

    sentry = SentryApi(cfg, bus, store, reactor, heartbeats=heartbeats)
    api.include(sentry)
    services["sentry"] = sentry.health  # the Api holds this dict: it reports what is added to it
    api.include(SilencesApi(silences, reactor))
    if not cfg.api.tokens:
        log.warn("[api] tokens is empty: the REST API is open to anyone who can reach it")
    elif not cfg.api.github_secret:
        log.warn("[api] github_secret is not set: the GitHub webhook (/api/webhooks/github) is open to anyone "
                 "who can reach it, though the rest of the REST API asks for a token")
    from cockpit.extensions import WsgiExtension, build_extensions, check_extensions

    extensions = build_extensions(
        cfg, extension_targets if extension_targets is not None else check_extensions(cfg), reactor, bus, store,
        site_factory=partial(ApiSite, settings=cfg.api, metrics=metrics, reactor=reactor),
        on_start_failure=on_start_failure or StartupFailure(reactor))
    for extension in extensions:
        api.extensions[extension.server.name] = extension.health
        if isinstance(extension, WsgiExtension) and extension.server.mount is not None:
            api.mounts[extension.server.name] = (extension.resource, extension.server.public)
    web = Listener("REST API and dashboard", cfg.api.endpoint(), api.site(reactor), reactor, scheme="http")
    web.setName("web")  # type: ignore[no-untyped-call]
    web.setServiceParent(top)  # type: ignore[no-untyped-call]
    for extension in extensions:  # last in: started after the cockpit's own services, stopped before them
        extension.setServiceParent(top)  # type: ignore[no-untyped-call]
    top.api = api  # type: ignore[attr-defined]
    top.robot = robot  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    top.catalog = catalog  # type: ignore[attr-defined]
    top.silences = silences  # type: ignore[attr-defined]
    return top
