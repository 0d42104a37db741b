"""Mail/s through the cockpit's SMTP server (parse, store, publish on Redis) against a bare Twisted ESMTP sink.

    python bench/smtp_ingest.py [--messages 4000] [--connections 20] [--rounds 5] [--max-seconds 60]

Starts a redis-server of its own on a free port and each server in a process of its own,
all on 127.0.0.1; the load comes from this process (asyncio, one connection per task).
Both servers get the same ~2 KB messages over the same number of connections: the sink is
twisted.mail's ESMTP with a delivery that discards every line; the cockpit parses each
message, stores its attachments and publishes its event before it answers 250. A second
load mixes in messages with attachments. Every phase stops after --messages or
--max-seconds, whichever comes first. Goal: the cockpit reaches at least 0.6 of the sink.

Each round measures the sink and then the cockpit, back to back, and gives their ratio;
the result is the median of the rounds' ratios. On a shared machine the rate of either
server moves by a third from one minute to the next, and a ratio of measurements taken
together is what such noise disturbs least.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from bench.result import result  # noqa: E402

GOAL = 0.6
DOMAIN = "cockpit.example.com"


# -- the servers, each run in a process of its own ---------------------------------------------

def serve_sink() -> None:
    from twisted.internet import defer, protocol, reactor
    from twisted.mail import smtp
    from zope.interface import implementer

    @implementer(smtp.IMessage)
    class Discard:
        def lineReceived(self, line):
            pass

        def eomReceived(self):
            return defer.succeed(None)

        def connectionLost(self):
            pass

    @implementer(smtp.IMessageDelivery)
    class Delivery:
        def receivedHeader(self, helo, origin, recipients):
            return None

        def validateFrom(self, helo, origin):
            return origin

        def validateTo(self, user):
            return Discard

    class Factory(protocol.ServerFactory):
        def buildProtocol(self, addr):
            p = smtp.ESMTP()
            p.delivery = Delivery()
            p.factory = self
            return p

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    print(f"READY {port.getHost().port}", flush=True)
    reactor.run()


def serve_cockpit(redis_url: str, data_dir: str) -> None:
    from twisted.internet import defer, reactor

    from cockpit.backends.redis import RedisBus
    from cockpit.config import MailSection, RedisSection
    from cockpit.parse_pool import ParserPool
    from cockpit.smtp import IncomingMailFactory
    from cockpit.store import Store

    bus = RedisBus(RedisSection(url=redis_url), reactor=reactor)
    bus.startService()
    mail = MailSection(domains=[DOMAIN], hostname="bench.test")  # the defaults, parsers included
    store = Store(Path(data_dir) / "store", "http://127.0.0.1:8080", reactor)
    parsers = ParserPool(mail.parsers, store.root, store.public_url, mail.parse_timeout, reactor)
    parsers.startService()
    factory = IncomingMailFactory(mail, bus, store, reactor, parsers=parsers)

    def listen(_):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        print(f"READY {port.getHost().port}", flush=True)

    defer.gatherResults([bus.when_connected(), parsers.when_ready()]).addCallback(listen)
    reactor.addSystemEventTrigger("before", "shutdown", parsers.stopService)
    reactor.run()


# -- the load ----------------------------------------------------------------------------------

def make_messages(count: int, with_attachments: bool) -> list[bytes]:
    """Distinct ~2 KB messages; with attachments, every fourth one carries two (~20 KB)."""
    messages = []
    for i in range(count):
        body = "".join(f"Line {n} of the report for node {i % 97}: disk {n * 7 % 100}% used on /var\r\n"
                       for n in range(30))
        head = (f"From: Monitor {i % 13} <monitor{i % 13}@example.org>\r\nTo: ops@{DOMAIN}\r\n"
                f"Subject: disk usage report {i}\r\nMessage-ID: <bench-{i}@example.org>\r\n"
                f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n")
        if with_attachments and i % 4 == 0:
            blob = base64.encodebytes(os.urandom(6000)).replace(b"\n", b"\r\n").decode()
            log = base64.encodebytes((body * 8).encode()).replace(b"\n", b"\r\n").decode()
            text = (head + "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
                    "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body +
                    "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
                    f"Content-Disposition: attachment; filename=\"dump-{i}.bin\"\r\n\r\n" + blob +
                    "--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
                    "Content-Disposition: attachment; filename=\"syslog.txt\"\r\n\r\n" + log + "--b--\r\n")
        else:
            text = head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body
        messages.append(text.encode())
    return messages


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        if line[3:4] != b"-":
            return line


async def _sender(port: int, queue: list[bytes], deadline: float, counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO bench\r\n")
    await _reply(reader)
    envelope = f"MAIL FROM:<monitor@example.org>\r\nRCPT TO:<ops@{DOMAIN}>\r\nDATA\r\n".encode()
    while queue and time.perf_counter() < deadline:
        message = queue.pop()
        # the envelope commands go in one write (as a pipelining client would); the message after 354
        writer.write(envelope)
        for _ in range(3):
            await _reply(reader)
        writer.write(message + b".\r\n")
        answer = await _reply(reader)
        counts["ok" if answer.startswith(b"250") else "refused"] += 1
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()
    await writer.wait_closed()


async def load(port: int, messages: list[bytes], connections: int, max_seconds: float) -> tuple[float, dict]:
    queue = list(reversed(messages))
    counts = {"ok": 0, "refused": 0}
    started = time.perf_counter()
    await asyncio.gather(*[_sender(port, queue, started + max_seconds, counts) for _ in range(connections)])
    elapsed = time.perf_counter() - started
    return counts["ok"] / elapsed, counts


# -- orchestration -----------------------------------------------------------------------------

class ServerProcess:
    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise SystemExit(f"the {args[1]} server did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def measure(kind: str, messages: list[bytes], args, redis=None, data_dir: str = "") -> float:
    if kind == "sink":
        server = ServerProcess("--serve", "sink")
    else:
        redis.flush()
        server = ServerProcess("--serve", "cockpit", "--redis-url", redis.url, "--data-dir", data_dir)
    try:
        rate, counts = asyncio.run(load(server.port, messages, args.connections, args.max_seconds))
    finally:
        server.stop()
    if counts["refused"]:
        raise SystemExit(f"{kind}: {counts['refused']} messages were refused")
    if kind == "cockpit":
        published = int(redis.command("XLEN", "ckpt.email").strip().split()[-1])
        if published != counts["ok"]:
            raise SystemExit(f"cockpit: {counts['ok']} messages got 250 but {published} events were published")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--serve", choices=["sink", "cockpit"], help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "sink":
        return serve_sink()
    if args.serve == "cockpit":
        return serve_cockpit(args.redis_url, args.data_dir)

    from tests.redis_server import RedisServer

    redis = RedisServer().start()
    try:
        plain = make_messages(args.messages, with_attachments=False)
        mixed = make_messages(args.messages, with_attachments=True)
        print(f"{args.messages} messages per phase over {args.connections} connections; plain "
              f"{sum(map(len, plain)) // len(plain)} bytes on average, mixed {sum(map(len, mixed)) // len(mixed)}")
        rounds = []
        for round_no in range(1, args.rounds + 1):
            with tempfile.TemporaryDirectory(prefix="cockpit-bench-") as data_dir:
                rates = {
                    "sink": measure("sink", plain, args),
                    "cockpit": measure("cockpit", plain, args, redis, data_dir),
                    "sink mixed": measure("sink", mixed, args),
                    "cockpit mixed": measure("cockpit", mixed, args, redis, data_dir),
                }
            rounds.append(rates)
            print(f"round {round_no}: " + ", ".join(f"{name} {rate:,.0f}/s" for name, rate in rates.items())
                  + f"; ratio {rates['cockpit'] / rates['sink']:.2f}, mixed {rates['cockpit mixed'] / rates['sink mixed']:.2f}")
    finally:
        redis.cleanup()

    ratio = statistics.median([r["cockpit"] / r["sink"] for r in rounds])
    mixed_ratio = statistics.median([r["cockpit mixed"] / r["sink mixed"] for r in rounds])
    print(f"plain ~2 KB (medians): bare Twisted ESMTP sink {statistics.median([r['sink'] for r in rounds]):,.0f} msg/s, "
          f"cockpit (parse, store, publish) {statistics.median([r['cockpit'] for r in rounds]):,.0f} msg/s")
    print(f"with attachments (1 in 4): sink {statistics.median([r['sink mixed'] for r in rounds]):,.0f} msg/s, "
          f"cockpit {statistics.median([r['cockpit mixed'] for r in rounds]):,.0f} msg/s, ratio {mixed_ratio:.2f}")
    print(f"ratio {ratio:.2f}, the median of {len(rounds)} rounds (goal >= {GOAL}): "
          f"{'met' if ratio >= GOAL else 'NOT met'}")
    result("smtp_ingest", f"{statistics.median([r['cockpit'] for r in rounds]):,.0f} msg/s",
           f"bare ESMTP sink {statistics.median([r['sink'] for r in rounds]):,.0f} msg/s", ratio, f">= {GOAL}",
           ratio >= GOAL, "parsing each mail on the reactor thread; with files, three fsyncs each")


if __name__ == "__main__":
    main()
