"""A redis-server of the test suite's own, on a free port.

The suite never talks to a Redis it did not start: every test that needs one gets
the address from here. ``stop()`` and ``start()`` keep the port, for fault tests.
"""
from __future__ import annotations

import atexit
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Optional


class RedisServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, *options: str) -> None:
        # further redis-server options, e.g. "--appendonly", "yes" for a server that keeps its data
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RedisServerError(
                "redis-server is not installed; the tests need it (apt-get install -y redis-server, "
                "or run .ci/run, which installs it)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cockpit-redis-")
        self.process: Optional[subprocess.Popen] = None
        self.output: list[str] = []
        self.options = options

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.process is not None:
            return self
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--loglevel", "notice",
             "--protected-mode", "yes", *self.options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        buffered = b""
        stdout = self.process.stdout
        assert stdout is not None
        while b"Ready to accept connections" not in buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                self.stop()
                raise RedisServerError(f"redis-server did not start on port {self.port}:\n"
                                       + buffered.decode(errors="replace")[-2000:])
            ready, _, _ = select.select([stdout], [], [], remaining)
            if ready:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    continue
                buffered += chunk
        self.output.append(buffered.decode(errors="replace"))
        # keep draining, or redis-server blocks once the pipe is full
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()
        return self

    @staticmethod
    def _drain(process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for _ in iter(lambda: process.stdout.read(65536), b""):
            pass

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it: only what it had written to disk is kept."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def command(self, *args: str) -> str:
        """Run ``redis-cli`` against this server (for assertions from outside the code under test)."""
        result = subprocess.run(["redis-cli", "-p", str(self.port), "--no-raw", *args],
                                capture_output=True, text=True, timeout=10)
        return result.stdout

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RedisServerError(f"FLUSHALL answered {reply!r}")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: Optional[RedisServer] = None


def shared_server() -> RedisServer:
    """One server for the whole run (flushed by each test that uses it)."""
    global _shared
    if _shared is None:
        _shared = RedisServer().start()
        atexit.register(_shared.cleanup)
    return _shared


def bus_on_shared_server(**settings: Any) -> tuple[RedisServer, Any]:
    """The shared server, flushed, and a RedisBus on it (with these RedisSection ``settings``), not
    started: what a behaviour's Redis case makes its bus with."""
    from twisted.internet import reactor

    from cockpit.backends.redis import RedisBus
    from cockpit.config import RedisSection

    server = shared_server()
    server.flush()
    return server, RedisBus(RedisSection(url=server.url, **settings), reactor=reactor)


def started_bus(test: Any, url: str, **settings: Any) -> Any:
    """A RedisBus on ``url`` (with these RedisSection ``settings``), started and stopped at the end of
    ``test``: a Deferred firing with it once it is connected."""
    from twisted.internet import reactor

    from cockpit.backends.redis import RedisBus
    from cockpit.config import RedisSection

    from tests.wiring import started

    return started(test, RedisBus(RedisSection(url=url, **settings), reactor=reactor))
