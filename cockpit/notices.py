"""Notices: one per group when it opens, reopens or resolves, and a repeat while nobody acks it (docs/design.md §11).

The group store makes a notice due in the same atomic step as the change that calls for it, and
leases each due notice to one caller (:meth:`cockpit.groups.GroupStore.claim_notices`). Every
cockpit process runs a :class:`Notifier`; between them each notice goes out once, and one that a
dying process was sending goes out from another after the lease. A notice about a group that an
active silence matches is held back; when that silence ends, each matching group still open gets
one notice. Repeats of an occurrence never make a notice: only changes of state do.

A notice goes to every channel: the Telegram ``[bot] notify_chats`` (with the buttons Ack, Close
and Silence 1h) and mail to ``[notify] mail_to`` through the relay.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.groups import KINDS, GroupStore

if TYPE_CHECKING:
    from cockpit.silences import SilenceStore
    from cockpit.smtp import MailSender

log = Logger()

NOTICE_LEASE = 60.0  # seconds a claimed notice is left to its claimer before another process sends it
SILENCE_HOUR = 3600.0  # what the chat's "Silence 1h" button silences for
OPEN_STATES = {"eco": ("NEW", "ALERT"), "alarm": ("firing",)}

HEADLINES = {
    ("alarm", "opened"): "🔥 Firing", ("alarm", "reopened"): "🔥 Firing again",
    ("alarm", "resolved"): "✅ Resolved", ("alarm", "repeat"): "🔥 Still firing",
    ("alarm", "silence ended"): "🔥 Firing (its silence ended)",
    ("eco", "opened"): "❗ New error", ("eco", "reopened"): "❗ Error again",
    ("eco", "resolved"): "✅ Closed", ("eco", "repeat"): "❗ Still happening",
    ("eco", "silence ended"): "❗ Error (its silence ended)",
}


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def notice_title(kind: str, group: dict[str, Any], reason: str) -> str:
    """One line: what happened, to what."""
    headline = HEADLINES.get((kind, reason), "Notice")
    if kind == "alarm":
        what = f"{group.get('method') or 'alarm'} on {group.get('service')}"
        return f"{headline}: {what}"
    return f"{headline} in {group.get('app_name') or 'an application'}: {group.get('error_msg') or group.get('eco_type')}"


def notice_text(kind: str, group: dict[str, Any], reason: str) -> str:
    """The text of a notice: its title, then the facts an on-call operator acts on."""
    lines = [notice_title(kind, group, reason)]
    if kind == "alarm":
        if group.get("msg"):
            lines.append(str(group["msg"]))
        if group.get("severity"):
            lines.append(f"severity: {group['severity']}")
        count = group.get("count", 1)
    else:
        if group.get("func_filename") or group.get("func_name"):
            lines.append(f"at {group.get('func_filename', '')}:{group.get('line_nbr', '')} {group.get('func_name', '')}")
        count = group.get("occurence", 1)
    lines.append(f"{count} time{'s' if count != 1 else ''} since {_when(group['first_time'])}, "
                 f"last {_when(group['last_time'])}")
    if group.get("url"):
        lines.append(str(group["url"]))
    lines.append(f"id {group['id']}")
    return "\n".join(lines)


class Channel(Protocol):
    """Where notices go; ``notify`` fails when it should be tried again later."""

    def notify(self, kind: str, group: dict[str, Any], reason: str) -> Deferred[Any]: ...


class MailChannel:
    """Notices by mail to ``[notify] mail_to``, through the relay's outbox (stored before it is accepted)."""

    def __init__(self, mailer: MailSender, mail_to: Sequence[str]):
        self.mailer = mailer
        self.mail_to = list(mail_to)

    def notify(self, kind: str, group: dict[str, Any], reason: str) -> Deferred[Any]:
        from cockpit.smtp import OutgoingMail

        mail = OutgoingMail(to=self.mail_to, subject=f"[cockpit] {notice_title(kind, group, reason)}"[:998],
                            body=notice_text(kind, group, reason))
        return self.mailer.send(mail)


class Notifier(Service):
    """Sends the due notices to every channel, once across every process on the backend.

    ``silences`` is a :class:`cockpit.silences.SilenceStore` (or None); ``repeat`` the seconds
    between two notices of a group that stays open and unacked (``[notify] repeat``).
    """

    interval = 1.0  # seconds between two looks at what is due

    def __init__(self, store: GroupStore, channels: Sequence[Channel], clock: IReactorTime,
                 repeat: float = 14400.0, silences: Optional[SilenceStore] = None, lease: float = NOTICE_LEASE):
        self.store = store
        self.channels = list(channels)
        self.clock = clock
        self.repeat = repeat
        self.silences = silences
        self.lease = lease
        self.looks = 0
        self.sent = 0
        self.held = 0
        self.failed = 0
        self.last_error: Optional[str] = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self._busy: Optional[Deferred[None]] = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        if self._loop.running:
            self._loop.stop()
        return self._busy  # a notice being sent is let finish; its lease covers a stop that cuts it

    def tick(self) -> Deferred[None]:
        """One look at what is due; a failure is logged and left to the next tick."""
        if self._busy is not None:
            return defer.succeed(None)
        self._busy = d = defer.ensureDeferred(self._tick())

        def done(result: Any) -> None:
            self._busy = None
            if isinstance(result, Failure):
                self.last_error = result.getErrorMessage()
                log.warn("notices could not be looked at now: {error}", error=self.last_error)

        d.addBoth(done)
        return d

    async def _tick(self) -> None:
        self.looks += 1
        if self.silences is not None:
            await self._silences_ended(self.silences)
        due = await self.store.claim_notices(self.lease)
        if not due:
            return
        silenced = await self._silenced()
        for kind, group, reason in due:
            if silenced(group):
                self.held += 1
                await self.store.noticed(kind, group["id"], reason, False, self.repeat)
                continue
            try:
                await defer.gatherResults([defer.maybeDeferred(c.notify, kind, group, reason)
                                           for c in self.channels], consumeErrors=True)
            except defer.FirstError as exc:
                self.failed += 1
                self.last_error = exc.subFailure.getErrorMessage()
                log.warn("a notice for {kind} group {id} could not be sent ({error}); it is tried again "
                         "in {lease:.0f} s", kind=kind, id=group["id"], error=self.last_error, lease=self.lease)
                continue
            self.sent += 1
            await self.store.noticed(kind, group["id"], reason, True, self.repeat)

    async def _silenced(self) -> Callable[[dict[str, Any]], bool]:
        """A test of whether a silence in force now covers a group."""
        if self.silences is None:
            return lambda group: False
        from cockpit.silences import matches

        active = await self.silences.active(self.clock.seconds())
        return lambda group: any(matches(s["matchers"], group) for s in active)

    async def _silences_ended(self, silences: SilenceStore) -> None:
        from cockpit.silences import matches

        ended = await silences.claim_ended(self.clock.seconds())
        for silence in ended:
            for kind in KINDS:
                for state in OPEN_STATES[kind]:
                    before = None
                    while True:
                        page, before = await self.store.page(kind, 1000, before, state)
                        for group in page:
                            if matches(silence["matchers"], group):
                                await self.store.notice_due(kind, group["id"], "silence ended")
                        if before is None:
                            break

    def health(self) -> dict[str, Any]:
        return {"ok": True, "looks": self.looks, "sent": self.sent, "held": self.held, "failed": self.failed,
                "channels": len(self.channels), "last_error": self.last_error}


__all__ = ["Channel", "MailChannel", "Notifier", "notice_text", "notice_title"]
