"""The mail parser pool: ``[mail] parsers`` long-lived ``python -m cockpit.parse_worker`` processes.

Big mail and mail with files are parsed here (a small plain message is parsed at once by
the SMTP server: that costs less than any hop). The stdlib parser holds the GIL and can
take seconds on a hostile message; in processes of their own, parsers use the other cores,
a hang or a crash costs one message, and the reactor only moves bytes.
:meth:`ParserPool.parse` sends a message to the parser with the fewest in hand and fires
with its :class:`EmailEvent`, or fails with:

- :class:`MessageRefused` (5xx): the parser refused it, or took longer than
  ``parse_timeout`` (its process is killed and replaced: a message that hangs the parser
  is refused for good, not retried forever);
- :class:`OSError`: the store could not write an attachment (451: the sender retries);
- :class:`ParserUnavailable`: its parser died or the pool stopped before it was parsed
  (451); messages queued behind it go to another parser;
- :class:`ParseFailed`: the parser failed on it (554, logged).

Starting, replacing and stopping the parsers is :class:`cockpit.processes.ChildPool`'s.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from cockpit.events import EmailEvent
from cockpit.mailparse import Envelope, MessageRefused
from cockpit.parse_worker import EVENT, FAILED, LEVEL_MARK, OUT_HEADER, READY, REFUSED, STORE_FAILED, request
from cockpit.processes import STOP_GRACE, ChildPool, ChildProcess

log = Logger()

WORKER_ARGS = ("-m", "cockpit.parse_worker")
MAX_FRAME = 1 << 30  # a longer answer means the parser is broken


class ParserUnavailable(Exception):
    """No parser took the message to the end; it was not parsed (the sender should retry)."""


class ParseFailed(Exception):
    """The parser failed on the message."""


@dataclass
class _Job:
    id: int
    chunks: list[bytes]
    size: int
    envelope: Envelope
    deferred: Deferred[EmailEvent] = field(default_factory=Deferred)


class ParserProcess(ChildProcess):
    """One parser: the messages it was sent, oldest (the one it works on) first."""

    def __init__(self, pool: "ParserPool"):
        super().__init__(pool)
        self.pool = pool
        self.queue: deque[_Job] = deque()
        self.buffer = bytearray()

    def send(self, job: _Job) -> None:
        if not self.queue:
            self.working(self.pool.parse_timeout)
        self.queue.append(job)
        envelope = [job.envelope.sender, job.envelope.recipients]
        self.process.writeSequence(request(job.id, envelope, job.chunks, job.size))

    def overran(self) -> None:
        log.error("mail parser {pid} spent over {timeout:g} s on one message from {sender}; "
                  "killing it, the message is refused", pid=self.pid, timeout=self.pool.parse_timeout,
                  sender=self.queue[0].envelope.sender)

    # -- ProcessProtocol -----------------------------------------------------
    def outReceived(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= OUT_HEADER.size:
            job_id, kind, size = OUT_HEADER.unpack_from(buffer, start)
            if size > MAX_FRAME:
                self._broken(f"an answer of {size} bytes")
                return
            end = start + OUT_HEADER.size + size
            if len(buffer) < end:
                break
            payload = bytes(buffer[end - size:end])
            start = end
            if not self._answer(job_id, kind, payload):
                return
        del buffer[:start]

    def _answer(self, job_id: int, kind: int, payload: bytes) -> bool:
        if kind == READY:
            self.became_ready()
            return True
        if not self.queue or self.queue[0].id != job_id:
            self._broken(f"an answer for message {job_id}, which it was not working on")
            return False
        job = self.queue.popleft()
        if self.queue:
            self.working(self.pool.parse_timeout)
        else:
            self.idle()
        self.pool.answered += 1
        if kind == EVENT:
            try:
                job.deferred.callback(EmailEvent.model_validate_json(payload))
            except Exception:
                job.deferred.errback(ParseFailed("the parser's event did not validate"))
        elif kind == REFUSED:
            code, text = json.loads(payload)
            job.deferred.errback(MessageRefused(int(code), str(text)))
        elif kind == STORE_FAILED:
            job.deferred.errback(OSError(payload.decode("utf-8", "replace")))
        elif kind == FAILED:
            job.deferred.errback(ParseFailed(payload.decode("utf-8", "replace")))
        else:
            self._broken(f"an answer of unknown kind {kind}")
            return False
        return True

    def _broken(self, what: str) -> None:
        log.error("mail parser {pid} sent {what}; killing it", pid=self.pid, what=what)
        self.kill("protocol")

    def errReceived(self, data: bytes) -> None:
        # the parser's own log lines start with their level (parse_worker.LEVEL_MARK)
        for line in data.decode("utf-8", "replace").splitlines():
            level, mark, text = line.partition(LEVEL_MARK)
            if not mark:
                level, text = "warn", line
            if text.strip():
                emit = {"debug": log.debug, "info": log.info, "error": log.error,
                        "critical": log.critical}.get(level, log.warn)
                emit("mail parser {pid}: {text}", pid=self.pid, text=text[:4000])


class ParserPool(ChildPool[ParserProcess]):
    """``size`` parser processes writing attachments to the store at ``store_root``."""

    child_name = "mail parser"

    def __init__(self, size: int, store_root: Any, public_url: str, parse_timeout: float,
                 reactor: IReactorProcess, clock: Optional[IReactorTime] = None):
        super().__init__(size, reactor, clock, stop_grace=STOP_GRACE)
        self.store_root = str(store_root)
        self.public_url = public_url
        self.parse_timeout = parse_timeout
        self._ids = 0
        self.answered = 0
        self._announced = False

    @property
    def parsers(self) -> list[ParserProcess]:
        """The parser processes, the ones starting and the ones being killed too."""
        return self.processes

    # -- lifetime ----------------------------------------------------------
    def new_child(self) -> ParserProcess:
        return ParserProcess(self)

    def child_args(self) -> tuple[str, ...]:
        return (*WORKER_ARGS, self.store_root, self.public_url)

    def child_ready(self, child: ParserProcess) -> None:
        if self.ready_count() >= self.size and not self._announced:
            self._announced = True
            log.info("mail parsers: {count} processes for big mail and mail with files, "
                     "{timeout:g} s per message at most", count=self.size, timeout=self.parse_timeout)

    def health(self) -> dict[str, Any]:
        # while the first parsers start, mail is parsed in threads: that is no fault
        return {"ok": self.ready_count() > 0 or not self.replaced, "parsers": len(self.parsers), "ready": self.ready_count(),
                "in_hand": sum(len(p.queue) for p in self.parsers), "answered": self.answered,
                "replaced": self.replaced}

    # -- parsing -----------------------------------------------------------
    def parse(self, chunks: list[bytes], size: int, envelope: Envelope) -> Deferred[EmailEvent]:
        """Fires with the message's EmailEvent; see the module's docstring for the failures."""
        self._ids += 1
        job = _Job(self._ids, chunks, sum(len(chunk) for chunk in chunks), envelope)
        self._send(job)
        return job.deferred

    def _send(self, job: _Job) -> None:
        ready = [p for p in self.parsers if self.usable(p)]
        if not self.running or not ready:
            job.deferred.errback(ParserUnavailable("no mail parser is running"))
            return
        min(ready, key=lambda p: len(p.queue)).send(job)

    def child_ended(self, parser: ParserProcess, code: Optional[int], signal: Optional[int]) -> None:
        jobs = list(parser.queue)
        parser.queue.clear()
        if not jobs:
            return
        head, rest = jobs[0], jobs[1:]
        if parser.killed_for == "timeout":
            head.deferred.errback(MessageRefused(
                554, f"5.6.0 The message could not be parsed within {self.parse_timeout:g} seconds"))
        else:
            how = f"exit code {code}" if code is not None else f"signal {signal}"
            if parser.killed_for != "stopping":
                log.error("mail parser {pid} died ({how}) while parsing a message from {sender}; "
                          "it is answered 451 so that its sender retries", pid=parser.pid, how=how,
                          sender=head.envelope.sender)
            head.deferred.errback(ParserUnavailable(f"the mail parser died ({how})"))
        for job in rest:  # they were not started: another parser takes them, in order
            self._send(job)
