"""Where outgoing mail waits for the relay: stored before it is accepted, kept across restarts.

:class:`RedisOutbox` (with a RedisBus): every mail is an entry of the stream ``ckpt.mail.out``,
read by the consumer group ``mailer`` through the bus's consumer machinery, so several cockpit
processes share the sending, a delivery left unfinished by a crash is reclaimed, and an entry
whose handling keeps failing moves to ``ckpt.dead``. A finished mail's entry is deleted, so the
stream holds only what is still to be sent. Delivery records live in the hash
``ckpt.mail.records``, ordered by the sorted set ``ckpt.mail.order`` and capped at ``history``.

:class:`SpoolOutbox` (with the embedded bus): one JSON file per mail in ``<data_dir>/mail``,
written atomically (temporary file, fsync, rename) off the reactor thread and read again at start.

Both hand each mail still to be sent to a ``take(mail) -> Deferred`` callback, which delivers it
and calls :meth:`finish` or, when the process stops first, :meth:`suspend`.
"""
from __future__ import annotations

import base64
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import txredisapi
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.bus import DEAD_LETTER_STREAM, Bus, BusUnavailable, Delivery, RedisBus, stream_key
from cockpit.files import is_unfinished, write_atomically

log = Logger()

MAIL_STREAM = stream_key("mail.out")  # "ckpt.mail.out": the mails still to be sent
MAIL_GROUP = "mailer"
MAIL_RECORDS = "ckpt.mail.records"  # hash: mail id -> delivery record (JSON)
MAIL_ORDER = "ckpt.mail.order"  # sorted set: mail id scored by the time it was queued
TERMINAL = frozenset({"sent", "failed"})
PARKED_IDLE_MS = 86_400_000  # how idle a suspended mail's entry is made to look: past any claim_idle

Take = Callable[["QueuedMail"], Deferred]


class MailQueueFull(Exception):
    """The outgoing queue is at its bound; the caller should answer 503 and try later."""


class Suspended(BusUnavailable):
    """A mail was put back for the next sender; its stream entry must stay pending, not be acknowledged."""


@dataclass
class QueuedMail:
    """One mail for the relay: its delivery record, its envelope recipients and the message itself."""

    record: dict[str, Any]
    recipients: list[str]
    raw: Optional[bytes]  # None once the mail is finished: only its record is kept
    entry: Optional[str] = None  # the stream entry it was read from (Redis)
    deliveries: int = 1  # how often that entry has been handed out (Redis)

    @property
    def id(self) -> str:
        return self.record["id"]

    def to_json(self) -> str:
        data: dict[str, Any] = {"id": self.id, "recipients": self.recipients, "record": self.record}
        if self.raw is not None:
            try:  # readable where it can be: a built message is UTF-8 text in practice
                data["raw"] = self.raw.decode("utf-8")
            except UnicodeDecodeError:
                data["raw_base64"] = base64.b64encode(self.raw).decode("ascii")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "QueuedMail":
        """ValueError when ``text`` is no stored mail."""
        try:
            data = json.loads(text)
            record = data["record"]
            if "raw" in data:
                raw: Optional[bytes] = data["raw"].encode("utf-8")
            elif "raw_base64" in data:
                raw = base64.b64decode(data["raw_base64"])
            else:
                raw = None
            mail = cls(dict(record), [str(r) for r in data["recipients"]], raw)
            if not isinstance(record.get("id"), str) or record["id"] != data["id"]:
                raise ValueError("the record's id does not match")
            return mail
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a stored mail: {exc}") from None


class Outbox:
    """The durable queue of outgoing mail; see the module docstring."""

    def add(self, mail: QueuedMail) -> Deferred:
        """Store ``mail``; fires once it is stored, or fails with MailQueueFull or BusUnavailable."""
        raise NotImplementedError

    def update(self, record: dict[str, Any]) -> Deferred:
        """Store a changed record of a mail still to be sent (attempts, error, next try)."""
        raise NotImplementedError

    def finish(self, mail: QueuedMail, dead_error: Optional[str] = None) -> Deferred:
        """Store the final record and drop the message; with ``dead_error``, keep it in ckpt.dead too."""
        raise NotImplementedError

    def suspend(self, mail: QueuedMail) -> Deferred:
        """This process stops before ``mail`` is finished: keep it (and its record) for the next taker."""
        raise NotImplementedError

    def records(self, limit: int) -> Deferred:
        """Fires with up to ``limit`` delivery records, newest first."""
        raise NotImplementedError

    def record(self, mail_id: str) -> Deferred:
        """Fires with the delivery record of ``mail_id``, or None."""
        raise NotImplementedError

    def start(self, take: Take) -> None:
        """Hand every stored mail still to be sent, and each one added from now on, to ``take``."""
        raise NotImplementedError

    def stop(self) -> Deferred:
        """Stop handing out mail; fires once the mails handed out have been finished or suspended."""
        raise NotImplementedError


def make_outbox(bus: Bus, data_dir: Path, reactor: Any, history: int = 500) -> Outbox:
    """Redis when the bus is Redis, else a spool directory under ``data_dir``."""
    if isinstance(bus, RedisBus):
        return RedisOutbox(bus, history=history)
    return SpoolOutbox(data_dir / "mail", reactor, history=history)


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

# One atomic step: refuse when full, else add the entry and the record and forget the oldest
# finished records past the cap (a record of a mail still queued is never forgotten).
_ADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[6]) then
  return redis.error_reply('FULL ' .. ARGV[6])
end
redis.call('XADD', KEYS[1], '*', 'event', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[5])
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[3], 0, math.min(over, 100) - 1)) do
    local rec = redis.call('HGET', KEYS[2], id)
    if not rec or cjson.decode(rec)['state'] ~= 'queued' then
      redis.call('HDEL', KEYS[2], id)
      redis.call('ZREM', KEYS[3], id)
    end
  end
end
return redis.call('XLEN', KEYS[1])
"""


class RedisOutbox(Outbox):
    """Outgoing mail in Redis, shared by every cockpit process on it (see the module docstring)."""

    def __init__(self, bus: RedisBus, history: int = 500, max_queued: int = 10000,
                 concurrency: int = 256, drain_timeout: float = 5.0):
        self.bus = bus
        self.history = history
        self.max_queued = max_queued
        self.concurrency = concurrency  # mails one process holds at once, waiting ones included
        self.drain_timeout = drain_timeout
        self.consumer: Any = None
        self.consumer_name: Optional[str] = None
        self._take: Optional[Take] = None

    def add(self, mail: QueuedMail) -> Deferred:
        d = self.bus.execute("EVAL", _ADD, "3", MAIL_STREAM, MAIL_RECORDS, MAIL_ORDER,
                             mail.id, json.dumps(mail.record), mail.to_json(),
                             repr(mail.record["queued"]), str(self.history), str(self.max_queued))

        def refused(failure: Failure) -> Failure:
            if failure.check(txredisapi.ResponseError) and "FULL" in failure.getErrorMessage():
                raise MailQueueFull(f"{self.max_queued} mails are waiting for the relay; try again later")
            if failure.check(txredisapi.ResponseError):
                raise BusUnavailable(f"Redis refused the mail: {failure.getErrorMessage()}")
            return failure

        return d.addErrback(refused)

    def update(self, record: dict[str, Any]) -> Deferred:
        return self.bus.execute("HSET", MAIL_RECORDS, record["id"], json.dumps(record))

    def finish(self, mail: QueuedMail, dead_error: Optional[str] = None) -> Deferred:
        commands: list[tuple[str, ...]] = [("HSET", MAIL_RECORDS, mail.id, json.dumps(mail.record))]
        if dead_error is not None:
            commands.append(("XADD", DEAD_LETTER_STREAM, "MAXLEN", "~", str(self.bus.stream_maxlen), "*",
                             "stream", MAIL_STREAM, "id", mail.entry or "", "group", MAIL_GROUP,
                             "deliveries", str(mail.deliveries), "error", dead_error, "event", mail.to_json()))
        if mail.entry is not None:
            commands += [("XACK", MAIL_STREAM, MAIL_GROUP, mail.entry), ("XDEL", MAIL_STREAM, mail.entry)]
        return self.bus.transaction(*commands)

    def suspend(self, mail: QueuedMail) -> Deferred:
        # The entry stays pending, made to look long idle so that the next reclaim (this
        # process's next start, or any other process's next round) takes it over. A new entry
        # would not do: the blocking read of the consumer being stopped could still get it.
        # RETRYCOUNT: the takeover counts a delivery, and a stop should not.
        commands: list[tuple[str, ...]] = [("HSET", MAIL_RECORDS, mail.id, json.dumps(mail.record))]
        if mail.entry is not None and self.consumer_name is not None:
            commands.append(("XCLAIM", MAIL_STREAM, MAIL_GROUP, self.consumer_name, "0", mail.entry,
                             "IDLE", str(PARKED_IDLE_MS), "RETRYCOUNT", str(max(mail.deliveries - 1, 0)),
                             "JUSTID"))

        def parked(_: Any) -> None:
            # not acknowledged: the consumer must leave the entry pending
            raise Suspended(f"mail {mail.id} stays queued for the next sender")

        return self.bus.transaction(*commands).addCallback(parked)

    def records(self, limit: int) -> Deferred:
        if limit <= 0:
            return defer.succeed([])

        def fetch(ids: list[str]) -> Any:
            if not ids:
                return []
            return self.bus.execute("HMGET", MAIL_RECORDS, *ids).addCallback(
                lambda found: [json.loads(text) for text in found if text])

        return self.bus.execute("ZREVRANGE", MAIL_ORDER, "0", str(limit - 1)).addCallback(fetch)

    def record(self, mail_id: str) -> Deferred:
        return self.bus.execute("HGET", MAIL_RECORDS, mail_id).addCallback(
            lambda text: json.loads(text) if text else None)

    def start(self, take: Take) -> None:
        self._take = take
        self.consumer = self.bus.consumer(MAIL_GROUP, self._handle, types=("mail.out",),
                                          concurrency=self.concurrency, drain_timeout=self.drain_timeout,
                                          decode=QueuedMail.from_json)
        self.consumer_name = self.consumer.consumer_name
        self.consumer.startService()
        # mails put back at a stop, or left by a crash, are taken at once, not a claim interval later
        self.consumer.reclaim().addErrback(
            lambda f: log.warn("mail outbox: first reclaim failed: {error}", error=f.getErrorMessage()))

    def stop(self) -> Deferred:
        consumer, self.consumer = self.consumer, None
        return defer.maybeDeferred(consumer.stopService) if consumer is not None else defer.succeed(None)

    def _handle(self, mail: QueuedMail, delivery: Delivery) -> Deferred:
        mail.entry, mail.deliveries = delivery.id, delivery.deliveries

        def take(stored: Optional[dict[str, Any]]) -> Any:
            if stored is not None and stored.get("id") == mail.id:
                mail.record = stored  # newer than the entry's copy: attempts made since it was written
            if mail.record.get("state") in TERMINAL:
                # finished before a crash took the acknowledgement with it
                mail.raw = None
                return self.finish(mail)
            assert self._take is not None
            return self._take(mail)

        return self.record(mail.id).addCallback(take)


# ---------------------------------------------------------------------------------------------
# Spool directory
# ---------------------------------------------------------------------------------------------

_SPOOL_NAME = re.compile(r"^[0-9a-f]{32}\.json$")


def _read_spool(directory: Path) -> tuple[list[QueuedMail], list[str]]:
    """The spooled mails, oldest first, and a sentence for each file that could not be read."""
    mails, problems = [], []
    if not directory.is_dir():
        return mails, problems
    for path in directory.iterdir():
        if is_unfinished(path.name):
            path.unlink(missing_ok=True)  # a write that a crash cut short; its old file is still there
            continue
        if not _SPOOL_NAME.match(path.name):
            continue
        try:
            mails.append(QueuedMail.from_json(path.read_text("utf-8")))
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    mails.sort(key=lambda m: m.record.get("queued") or 0)
    return mails, problems


class SpoolOutbox(Outbox):
    """Outgoing mail in a directory of this process (the embedded bus); ``None`` keeps it in memory."""

    def __init__(self, directory: Optional[Path], reactor: Any = None, history: int = 500,
                 max_queued: int = 10000):
        if reactor is None:
            from twisted.internet import reactor
        self.directory = directory
        self.reactor = reactor
        self.history = history
        self.max_queued = max_queued
        self._mails: "OrderedDict[str, QueuedMail]" = OrderedDict()  # oldest first
        self._disk = defer.DeferredLock()  # one disk operation at a time: writes of a file stay in order
        self._loading = False
        self._load_waiters: list[Deferred] = []
        self._take: Optional[Take] = None

    # -- disk, in a thread ------------------------------------------------------------------
    def _on_disk(self, work: Callable[..., Any], *args: Any) -> Deferred:
        if self.directory is None:
            return defer.succeed(None)
        return self._disk.run(threads.deferToThreadPool, self.reactor, self.reactor.getThreadPool(),
                              work, *args)

    def _path(self, mail_id: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{mail_id}.json"

    def _save(self, mail: QueuedMail) -> Deferred:
        # the record is copied now: the delivery goes on changing it while the thread writes
        snapshot = QueuedMail(dict(mail.record), mail.recipients, mail.raw)
        return self._on_disk(lambda: write_atomically(self._path(mail.id), snapshot.to_json().encode("utf-8")))

    # -- Outbox ---------------------------------------------------------------------------------
    def add(self, mail: QueuedMail) -> Deferred:
        queued = sum(1 for m in self._mails.values() if m.raw is not None)
        if queued >= self.max_queued:
            return defer.fail(MailQueueFull(f"{queued} mails are waiting for the relay; try again later"))

        def unwritable(failure: Failure) -> None:
            failure.trap(OSError)
            raise BusUnavailable(f"the mail spool {self.directory} cannot be written: {failure.getErrorMessage()}")

        def stored(_: Any) -> None:
            self._mails[mail.id] = mail
            self._trim()
            if self._take is not None:
                self._hand_over(mail)

        return self._save(mail).addCallbacks(stored, unwritable)

    def update(self, record: dict[str, Any]) -> Deferred:
        mail = self._mails.get(record["id"])
        if mail is None:
            return defer.succeed(None)
        mail.record = record
        return self._save(mail)

    def finish(self, mail: QueuedMail, dead_error: Optional[str] = None) -> Deferred:
        # the record stays (the mail's own file, now without the message); a failed mail's
        # record says why, which is what ckpt.dead would keep for it
        mail.raw = None
        self._mails[mail.id] = mail
        d = self._save(mail)
        self._trim()
        return d

    def suspend(self, mail: QueuedMail) -> Deferred:
        return self._save(mail)

    def _trim(self) -> None:
        over = len(self._mails) - self.history
        for mail_id in [i for i, m in self._mails.items() if m.raw is None][:max(over, 0)]:
            del self._mails[mail_id]
            if self.directory is not None:
                self._on_disk(self._path(mail_id).unlink, True).addErrback(
                    lambda f, i=mail_id: log.warn("cannot remove the spooled record {id}: {error}",
                                                  id=i, error=f.getErrorMessage()))

    def _loaded(self) -> Deferred:
        """Fires once the spool has been read (at once when it is not being read)."""
        if not self._loading:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._load_waiters.append(d)
        return d

    def records(self, limit: int) -> Deferred:
        return self._loaded().addCallback(lambda _: [dict(m.record) for m in
                                                   list(reversed(self._mails.values()))[:max(limit, 0)]])

    def record(self, mail_id: str) -> Deferred:
        def find(_: Any) -> Optional[dict[str, Any]]:
            mail = self._mails.get(mail_id)
            return dict(mail.record) if mail is not None else None
        return self._loaded().addCallback(find)

    def start(self, take: Take) -> None:
        self._take = take
        if self.directory is None:
            for mail in [m for m in self._mails.values() if m.raw is not None]:
                self._hand_over(mail)
            return
        loading = self._disk.run(threads.deferToThreadPool, self.reactor, self.reactor.getThreadPool(),
                                 _read_spool, self.directory)
        self._loading = True
        loading.addCallback(self._read).addErrback(
            lambda f: log.failure("cannot read the mail spool {dir}", f, dir=self.directory)
        ).addBoth(self._read_done)

    def _read_done(self, _: Any) -> None:
        self._loading = False
        waiters, self._load_waiters = self._load_waiters, []
        for d in waiters:
            d.callback(None)

    def _read(self, found: tuple[list[QueuedMail], list[str]]) -> None:
        mails, problems = found
        for problem in problems:
            log.error("mail spool: skipped an unreadable file: {problem}", problem=problem)
        for mail in mails:
            if mail.id not in self._mails:
                if mail.record.get("state") in TERMINAL:
                    mail.raw = None
                self._mails[mail.id] = mail
        self._mails = OrderedDict(sorted(self._mails.items(), key=lambda item: item[1].record.get("queued") or 0))
        self._trim()
        waiting = [m for m in self._mails.values() if m.raw is not None]
        if waiting:
            log.info("mail spool {dir}: {count} mails still to be sent", dir=self.directory, count=len(waiting))
        if self._take is not None:
            for mail in waiting:
                self._hand_over(mail)

    def _hand_over(self, mail: QueuedMail) -> None:
        assert self._take is not None
        self._take(mail).addErrback(lambda f: log.failure("mail {id}: delivery failed", f, id=mail.id))

    def stop(self) -> Deferred:
        self._take = None
        return self._loaded()

    def queued(self) -> int:
        return sum(1 for m in self._mails.values() if m.raw is not None)
