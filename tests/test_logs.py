from __future__ import annotations

import io
import json
import os
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cockpit.backends.redis.bus import RedisBus
from cockpit import config
from cockpit.config import RedisSection
from cockpit.events import EmailEvent
from cockpit.logs import json_observer
from cockpit.tap import ServiceTree, build, default_log_observer
from tests.redis_server import RedisServer
from tests.test_ays import RobotCase


class JsonLogTests(TestCase):
    def test_each_event_is_one_json_line_with_its_fields(self):
        out = io.StringIO()
        log = Logger(namespace="cockpit.test", observer=json_observer(out))
        log.info("delivered {count} events", count=3)
        log.warn("odd {thing}", thing=object())
        lines = out.getvalue().splitlines()
        self.assertEqual(2, len(lines))
        first = json.loads(lines[0])
        self.assertEqual(("info", "cockpit.test", "delivered 3 events", 3),
                         (first["level"], first["namespace"], first["message"], first["count"]))
        second = json.loads(lines[1])
        self.assertEqual("warn", second["level"])
        self.assertTrue(second["thing"].startswith("<object"))

    def test_failures_carry_their_traceback(self):
        out = io.StringIO()
        log = Logger(namespace="cockpit.test", observer=json_observer(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke")
        record = json.loads(out.getvalue())
        self.assertEqual("critical", record["level"])
        self.assertIn("ZeroDivisionError", record["traceback"])


class RedisOutageLines(TestCase):
    """A Redis outage is two lines from the bus, not one line per reconnection attempt."""

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.events: list[dict] = []
        self.waiting: list[tuple[Callable[[dict], bool], Deferred]] = []
        self.out = io.StringIO()
        self.written = json_observer(self.out)
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)
        self.bus = RedisBus(RedisSection(url=self.redis.url, timeout=2.0), reactor=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        return self.bus.when_connected()

    def observe(self, event: dict) -> None:
        self.events.append(event)
        self.written(event)
        for entry in list(self.waiting):
            if entry[0](event):
                self.waiting.remove(entry)
                entry[1].callback(event)

    def next_event(self, wanted: Callable[[dict], bool]) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append((wanted, d))
        return d.addTimeout(30, reactor)

    def bus_lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "cockpit.backends.redis.bus"]

    @inlineCallbacks
    def test_an_outage_logs_one_line_when_redis_goes_and_one_when_it_is_back(self):
        def retry(event):
            return str(event.get("log_format", "")).startswith("Scheduling retry")

        consumer = self.bus.consumer("outage", lambda event, delivery: None, types=["alarm"])
        consumer.block_ms = 100
        consumer.startService()
        self.addCleanup(consumer.stopService)
        yield consumer.take_over()  # it beats, and reads
        lost = self.next_event(lambda e: "lost the connection" in formatEvent(e))
        self.redis.kill()
        yield lost
        # several reconnection attempts fail before Redis is back
        for _ in range(3):
            yield self.next_event(retry)
        back = self.next_event(lambda e: "reachable again" in formatEvent(e))
        self.redis.start()
        yield back
        yield self.bus.when_connected()
        outage = [line for line in self.bus_lines() if "lost the connection" in line or "reachable" in line]
        self.assertEqual(2, len(outage), outage)
        self.assertIn(f"Redis at {self.redis.url}", outage[0])
        written = [json.loads(line)["message"] for line in self.out.getvalue().splitlines()]
        self.assertEqual([], [m for m in written if m.startswith("Scheduling retry") or "dead connection" in m])
        self.assertTrue(any("lost the connection" in m for m in written), written)
        # nor does each consumer say it again at every beat and read while the bus is away
        self.assertEqual([], [m for m in written if "heartbeat failed" in m or "cannot read" in m])

    @inlineCallbacks
    def test_stopping_the_bus_is_not_an_outage(self):
        yield self.bus.stopService()
        self.assertEqual([], [line for line in self.bus_lines() if "lost the connection" in line])


class FailedRunLine(RobotCase):
    """A failed action run is a warning naming the run, the service, the action and the error."""

    @inlineCallbacks
    def test_a_failed_run_logs_a_warning_with_the_errors_last_line(self):
        yield self.make_repo()
        warnings: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "cockpit.ays" and event.get("log_level") == LogLevel.warn:
                warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        failed, failed_done = self.robot.run_action("demo", "node!web1", "escalate",
                                                    event=EmailEvent(subject="raise"))
        ok, ok_done = self.robot.run_action("demo", "node!web1", "escalate", event=EmailEvent(subject="fine"))
        yield failed_done
        yield ok_done
        self.assertEqual([f"run {failed.id}: escalate of node!web1 in demo ended in error: "
                          "RuntimeError: escalation failed"], warnings)


class StartWarnings(TestCase):
    """What start-up warns about in the configuration."""

    def warnings_of(self, api: dict) -> list[str]:
        lines: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "cockpit.tap" and event.get("log_level") == LogLevel.warn:
                lines.append(formatEvent(event))

        cfg = config.from_dict({"cockpit": {"data_dir": os.path.abspath(self.mktemp())}, "api": {"port": 0, **api},
                                "mail": {"port": 0}})
        globalLogPublisher.addObserver(observe)
        try:
            build(cfg, reactor)
        finally:
            globalLogPublisher.removeObserver(observe)
        return lines

    def test_tokens_without_a_github_secret_say_the_webhook_is_open(self):
        [line] = self.warnings_of({"tokens": ["t"]})
        self.assertIn("[api] github_secret is not set: the GitHub webhook (/api/webhooks/github) is open", line)
        self.assertEqual([], self.warnings_of({"tokens": ["t"], "github_secret": "s"}))
        [line] = self.warnings_of({})  # everything is open: one line says so
        self.assertIn("[api] tokens is empty", line)


class PlainTwistdLines(TestCase):
    """``twistd -n cockpit`` with no ``--logger`` still leaves out the reconnection attempts."""

    timeout = 60

    def twistd_options(self, *args: str) -> Any:
        from twisted.scripts.twistd import ServerOptions

        options = ServerOptions()
        options.parseOptions([*args, "cockpit"])
        return options

    def test_the_tree_gives_twistd_the_quiet_observer_when_twistd_was_told_nothing(self):
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        out = io.StringIO()
        tree = ServiceTree()
        tree.log_observer = default_log_observer(self.twistd_options("-n"), out)
        application = Application("cockpit")
        tree.setServiceParent(application)
        observer = ILogObserver(application)  # what twistd logs through, given no --logger
        observer({"log_namespace": "twisted.application._client_service.ClientService",
                  "log_format": "Scheduling retry {n} to connect", "n": 3, "log_time": 0,
                  "log_level": LogLevel.info})
        observer({"log_namespace": "cockpit.backends.redis.bus", "log_format": "bus: Redis at {url} is reachable again",
                  "url": "redis://127.0.0.1:1", "log_time": 0, "log_level": LogLevel.info})
        self.assertEqual(["bus: Redis at redis://127.0.0.1:1 is reachable again"],
                         [line.split("] ", 1)[-1] for line in out.getvalue().splitlines()])

    def test_a_logger_syslog_logfile_or_daemon_chosen_on_the_command_line_stands(self):
        for args in (["-n", "--logger", "cockpit.logs.json_observer"], ["-n", "--logfile", self.mktemp()],
                     ["-n", "--syslog"], []):
            self.assertIsNone(default_log_observer(self.twistd_options(*args)), args)
        self.assertIsNotNone(default_log_observer(self.twistd_options("-n", "--logfile", "-")))

    @inlineCallbacks
    def test_a_real_twistd_that_waits_for_redis_prints_no_retry_lines(self):
        from tests.cockpits import call, eventually, spawn_cockpit

        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        redis.stop()  # the cockpit starts with Redis away: its first connection fails, and it retries
        running = spawn_cockpit(self, extra=f'[redis]\nurl = "{redis.url}"\n')
        port = yield running.proc.listening
        code, health = yield call("GET", f"http://127.0.0.1:{port}/api/health")
        self.assertEqual((503, False), (code, health["bus"]["ok"]))
        redis.start()

        @inlineCallbacks
        def bus_up() -> Any:
            _, health = yield call("GET", f"http://127.0.0.1:{port}/api/health")
            return bool(health and health["bus"]["ok"])

        yield eventually(bus_up, timeout=30, interval=0.05, what="the bus connected, through a retry")
        yield running.proc.when_output(b"bus: Redis at")
        self.assertNotIn("Scheduling retry", running.log)
        self.assertNotIn("Discarding dead connection", running.log)

    @inlineCallbacks
    def test_a_real_twistd_logs_its_listeners_without_object_reprs(self):
        from tests.cockpits import spawn_cockpit

        running = spawn_cockpit(self)
        yield running.proc.listening
        yield running.proc.when_output(b"SMTP on 127.0.0.1:")
        self.assertIn("REST API and dashboard on http://127.0.0.1:", running.log)
        self.assertNotIn("Starting factory", running.log)  # "Starting factory <cockpit.web.ApiSite object at 0x...>"
        self.assertNotIn(" object at 0x", running.log)
