"""Where outgoing mail waits for the relay: stored before it is accepted, kept across restarts.

The outbox is the backend's (:mod:`cockpit.backends`). On Redis, every mail is an entry of the stream ``ckpt.mail.out``,
read by the consumer group ``mailer`` through the bus's consumer machinery, so several cockpit
processes share the sending, a delivery left unfinished by a crash is reclaimed, and an entry
whose handling keeps failing moves to ``ckpt.dead``. A finished mail's entry is deleted, so the
stream holds only what is still to be sent. Delivery records live in the hash
``ckpt.mail.records``, ordered by the sorted set ``ckpt.mail.order`` and capped at ``history``.

Embedded: one JSON file per mail in ``<data_dir>/mail``,
written atomically (temporary file, fsync, rename) off the reactor thread and read again at start.

Both hand each mail still to be sent to a ``take(mail) -> Deferred`` callback, which delivers it
and calls :meth:`finish` or, when the process stops first, :meth:`suspend`.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cockpit.bus import BusUnavailable, stream_key

log = Logger()

MAIL_STREAM = stream_key("mail.out")  # "ckpt.mail.out": the mails still to be sent
MAIL_GROUP = "mailer"
MAIL_RECORDS = "ckpt.mail.records"  # hash: mail id -> delivery record (JSON)
MAIL_ORDER = "ckpt.mail.order"  # sorted set: mail id scored by the time it was queued
TERMINAL = frozenset({"sent", "failed"})
PARKED_IDLE_MS = 86_400_000  # how idle a suspended mail's entry is made to look: past any claim_idle

Take = Callable[["QueuedMail"], Deferred[Any]]


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
        mail_id: str = self.record["id"]  # from_json and MailSender.send make it a str
        return mail_id

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

    def add(self, mail: QueuedMail) -> Deferred[Any]:
        """Store ``mail``; fires once it is stored, or fails with MailQueueFull or BusUnavailable."""
        raise NotImplementedError

    def update(self, record: dict[str, Any]) -> Deferred[Any]:
        """Store a changed record of a mail still to be sent (attempts, error, next try)."""
        raise NotImplementedError

    def finish(self, mail: QueuedMail, dead_error: Optional[str] = None) -> Deferred[Any]:
        """Store the final record and drop the message; with ``dead_error``, keep it in ckpt.dead too."""
        raise NotImplementedError

    def suspend(self, mail: QueuedMail) -> Deferred[Any]:
        """This process stops before ``mail`` is finished: keep it (and its record) for the next taker."""
        raise NotImplementedError

    def records(self, limit: int) -> Deferred[list[dict[str, Any]]]:
        """Fires with up to ``limit`` delivery records, newest first."""
        raise NotImplementedError

    def record(self, mail_id: str) -> Deferred[Optional[dict[str, Any]]]:
        """Fires with the delivery record of ``mail_id``, or None."""
        raise NotImplementedError

    def start(self, take: Take) -> None:
        """Hand every stored mail still to be sent, and each one added from now on, to ``take``."""
        raise NotImplementedError

    def stop(self) -> Deferred[None]:
        """Stop handing out mail; fires once the mails handed out have been finished or suspended."""
        raise NotImplementedError
