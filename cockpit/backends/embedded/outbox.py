"""Outgoing mail in a spool directory of this process: one JSON file a mail (see :mod:`cockpit.outbox`)."""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.bus import BusUnavailable
from cockpit.files import is_unfinished, write_atomically
from cockpit.outbox import TERMINAL, MailQueueFull, Outbox, QueuedMail, Take

log = Logger()

_T = TypeVar("_T")

_SPOOL_NAME = re.compile(r"^[0-9a-f]{32}\.json$")


def _remove_failed(failure: Failure, mail_id: str) -> None:
    log.warn("cannot remove the spooled record {id}: {error}", id=mail_id, error=failure.getErrorMessage())


def _read_spool(directory: Path) -> tuple[list[QueuedMail], list[str]]:
    """The spooled mails, oldest first, and a sentence for each file that could not be read."""
    mails: list[QueuedMail] = []
    problems: list[str] = []
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

    def __init__(self, directory: Optional[Path], reactor: Any, history: int = 500,
                 max_queued: int = 10000):
        self.directory = directory
        self.reactor = reactor
        self.history = history
        self.max_queued = max_queued
        self._mails: "OrderedDict[str, QueuedMail]" = OrderedDict()  # oldest first
        self._disk = defer.DeferredLock()  # one disk operation at a time: writes of a file stay in order
        self._loading = False
        self._load_waiters: list[Deferred[None]] = []
        self._take: Optional[Take] = None

    # -- disk, in a thread ------------------------------------------------------------------
    def _on_disk(self, work: Callable[..., _T], *args: Any) -> Deferred[Optional[_T]]:
        if self.directory is None:
            return defer.succeed(None)
        return self._disk.run(threads.deferToThreadPool, self.reactor, self.reactor.getThreadPool(),
                              work, *args)

    def _path(self, mail_id: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{mail_id}.json"

    def _save(self, mail: QueuedMail) -> Deferred[None]:
        # the record is copied now: the delivery goes on changing it while the thread writes
        snapshot = QueuedMail(dict(mail.record), mail.recipients, mail.raw)
        return self._on_disk(lambda: write_atomically(self._path(mail.id), snapshot.to_json().encode("utf-8")))

    # -- Outbox ---------------------------------------------------------------------------------
    def add(self, mail: QueuedMail) -> Deferred[None]:
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

    def update(self, record: dict[str, Any]) -> Deferred[None]:
        mail = self._mails.get(record["id"])
        if mail is None:
            return defer.succeed(None)
        mail.record = record
        return self._save(mail)

    def finish(self, mail: QueuedMail, dead_error: Optional[str] = None) -> Deferred[None]:
        # the record stays (the mail's own file, now without the message); a failed mail's
        # record says why, which is what ckpt.dead would keep for it
        mail.raw = None
        self._mails[mail.id] = mail
        d = self._save(mail)
        self._trim()
        return d

    def suspend(self, mail: QueuedMail) -> Deferred[None]:
        return self._save(mail)

    def _trim(self) -> None:
        over = len(self._mails) - self.history
        for mail_id in [i for i, m in self._mails.items() if m.raw is None][:max(over, 0)]:
            del self._mails[mail_id]
            if self.directory is not None:
                self._on_disk(self._path(mail_id).unlink, True).addErrback(_remove_failed, mail_id)

    def _loaded(self) -> Deferred[None]:
        """Fires once the spool has been read (at once when it is not being read)."""
        if not self._loading:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._load_waiters.append(d)
        return d

    def records(self, limit: int) -> Deferred[list[dict[str, Any]]]:
        return self._loaded().addCallback(lambda _: [dict(m.record) for m in
                                                   list(reversed(self._mails.values()))[:max(limit, 0)]])

    def record(self, mail_id: str) -> Deferred[Optional[dict[str, Any]]]:
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

    def stop(self) -> Deferred[None]:
        self._take = None
        return self._loaded()

    def queued(self) -> int:
        return sum(1 for m in self._mails.values() if m.raw is not None)
