"""The Redis handshake (AUTH, SELECT): a refusal is final, a dropped connection is tried again."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cockpit.backends.redis import RedisBus
from cockpit.config import RedisSection
from cockpit.events import AlarmEvent
from tests.redis_server import RedisServer


class ScriptedRedis(protocol.Protocol):
    """Answers what its connection's script says: ``drop`` closes on the first command,
    ``loading`` answers it with a LOADING error, ``ok`` plays a Redis that takes AUTH and SELECT."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        scripts = self.factory.scripts
        self.script = scripts.pop(0) if scripts else "ok"
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            command = self._command()
            if command is None:
                return
            self.factory.commands.append((self.factory.connections, command))
            if self.script == "drop":
                self.transport.loseConnection()  # as a Redis that restarts under the handshake
                return
            if self.script == "loading":
                self.transport.write(b"-LOADING Redis is loading the dataset in memory\r\n")
                self.transport.loseConnection()
                return
            name = command[0].upper()
            self.transport.write({b"AUTH": b"+OK\r\n", b"SELECT": b"+OK\r\n", b"PING": b"+PONG\r\n"}.get(
                name, b"-ERR unknown command\r\n"))

    def _command(self) -> Any:
        # only what a client sends: an array of bulk strings
        lines = self.buffer.split(b"\r\n")
        if not lines[0].startswith(b"*") or len(lines) < 2:
            return None
        count = int(lines[0][1:])
        if len(lines) < 1 + 2 * count + 1:
            return None
        args = [lines[2 + 2 * i] for i in range(count)]
        consumed = sum(len(line) + 2 for line in lines[:1 + 2 * count])
        self.buffer = self.buffer[consumed:]
        return args


class ScriptedRedisFactory(protocol.Factory):
    protocol = ScriptedRedis

    def __init__(self, scripts: list[str]):
        self.scripts = scripts
        self.connections = 0
        self.commands: list[tuple[int, list[bytes]]] = []


class LogWatch:
    """Collects formatted log lines; ``wait_for(text)`` fires once one contains ``text``."""

    def __init__(self, test: TestCase):
        self.lines: list[str] = []
        self._waiting: list[tuple[str, Deferred]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        line = formatEvent(event)
        self.lines.append(line)
        for text, d in list(self._waiting):
            if text in line:
                self._waiting.remove((text, d))
                reactor.callLater(0, d.callback, line)

    def wait_for(self, text: str) -> Deferred:
        for line in self.lines:
            if text in line:
                return defer.succeed(line)
        d: Deferred = Deferred()
        self._waiting.append((text, d))
        return d


class HandshakeTests(TestCase):
    timeout = 20

    def bus(self, url: str) -> RedisBus:
        bus = RedisBus(RedisSection(url=url, timeout=2.0), reactor=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        # no backoff between attempts: the first attempt is under way already, the next ones follow at once
        bus._factory.initialDelay = bus._factory.maxDelay = 0
        return bus

    @inlineCallbacks
    def test_a_connection_dropped_during_auth_or_select_is_made_again(self):
        server = ScriptedRedisFactory(["drop", "loading", "ok"])
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        logs = LogWatch(self)
        bus = self.bus(f"redis://:s3cret@127.0.0.1:{port.getHost().port}/2")
        yield bus.when_connected()
        self.assertEqual("PONG", (yield bus.execute("PING")))
        self.assertEqual(3, server.connections)
        self.assertEqual([(3, [b"AUTH", b"s3cret"]), (3, [b"SELECT", b"2"]), (3, [b"PING"])],
                         [c for c in server.commands if c[0] == 3])
        self.assertTrue(bus.health()["ok"])
        log = "\n".join(logs.lines)
        self.assertIn("the connection failed during AUTH", log)
        self.assertIn("reconnecting", log)
        self.assertNotIn("s3cret", log)


class RedisWithPasswordTests(TestCase):
    timeout = 20

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.redis.command("CONFIG", "SET", "requirepass", "s3cret")

    def bus(self, url: str) -> RedisBus:
        bus = RedisBus(RedisSection(url=url, timeout=2.0), reactor=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        return bus

    @inlineCallbacks
    def test_the_password_and_the_database_of_the_url_are_used(self):
        bus = self.bus(f"redis://:s3cret@127.0.0.1:{self.redis.port}/3")
        yield bus.when_connected()
        yield bus.publish(AlarmEvent(service="node!a", method="disk"))
        self.assertEqual("(integer) 1", self.redis.command("-a", "s3cret", "-n", "3", "XLEN", "ckpt.alarm").strip())
        self.assertEqual("(integer) 0", self.redis.command("-a", "s3cret", "-n", "0", "XLEN", "ckpt.alarm").strip())

    @inlineCallbacks
    def test_a_wrong_password_is_final_and_said_clearly(self):
        logs = LogWatch(self)
        bus = self.bus(f"redis://:not-the-password@127.0.0.1:{self.redis.port}/0")
        line = yield logs.wait_for("refused AUTH")
        self.assertIn("WRONGPASS", line)
        self.assertIn("not reconnecting", line)
        self.assertNotIn("not-the-password", "\n".join(logs.lines))
        self.assertTrue(bus._factory.stopped)  # no new connection is attempted
        self.assertFalse(bus.health()["ok"])

    @inlineCallbacks
    def test_a_database_that_does_not_exist_is_final(self):
        logs = LogWatch(self)
        self.bus(f"redis://:s3cret@127.0.0.1:{self.redis.port}/99")
        line = yield logs.wait_for("refused SELECT")
        self.assertIn("DB index is out of range", line)
