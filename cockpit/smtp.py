"""Mail: the ESMTP server that turns incoming mail into email events, and the sender of outgoing mail.

Receiving (docs/design.md §2 [mail], §3 email, §4): recipients outside ``[mail] domains`` get
550 5.1.1; ``SIZE <max_size>`` is advertised and enforced while the data streams in
(552 without buffering past the limit); STARTTLS when a certificate is configured and
AUTH PLAIN/LOGIN only after it. A message is read by :mod:`cockpit.mailparse` (the
stdlib ``email`` package with ``policy.default``): at once when it is small with no file
to store and no HTML to convert, otherwise in a mail parser process. Its attachments go
to the store space ``attachments``, and its event is published before 250 is sent; when
the bus cannot take it the answer is 451 4.3.0, so the sending server retries.

Sending: :class:`MailSender` delivers :class:`OutgoingMail` through ``[mail.relay]``
with STARTTLS or implicit TLS and AUTH, retrying with backoff; a mail is stored in an
outbox (Redis, or a spool directory with the embedded bus) before it is accepted.
"""
from __future__ import annotations

import base64
import datetime
import hmac
import ipaddress
import re
import uuid
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence, Union

from markdownify import markdownify
from pydantic import BaseModel, ConfigDict, Field, field_validator
from twisted.application.service import Service
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from cockpit.backoff import doubling
from cockpit.bus import Bus, BusUnavailable
from cockpit.compat import LOGINCredentials, PLAINCredentials
from cockpit.config import MailSection, RelaySection
from cockpit.events import EmailEvent
from cockpit.mailparse import NO_WRITES, Envelope, MessageRefused, NotOnReactor, clean_text, parse_mail, unstuff
from cockpit.metrics import NO_METRICS
from cockpit.outbox import Outbox, QueuedMail, Suspended
from cockpit.parse_pool import ParserPool, ParserUnavailable
from cockpit.store import Store

log = Logger()

RAWDATA = "RAWDATA"  # our DATA state: the message streams in as bytes, not line by line
MAX_RECIPIENTS = 100
MAX_COMMAND_LINE = 4096  # RFC 5321 allows 512; AUTH responses are longer
MAX_WAITING = 256 << 10  # input kept while a message is handled, before reading stops
MAX_AUTH_DELAY = 60.0  # seconds: the longest wait before a failed AUTH is answered
MAX_TRACKED_PEERS = 10000  # client addresses whose failed AUTHs are counted; past it the oldest go

# a received message that waits for its event: its chunks, its envelope, and what fires with its reply
_Received = tuple[list[bytes], Envelope, Deferred[tuple[int, bytes]]]


# ---------------------------------------------------------------------------------------------
# Receiving: SMTP dialogue -> parse -> publish -> reply.
# ---------------------------------------------------------------------------------------------

def parse_job(items: list[tuple[list[bytes], Envelope]], store: Store) -> list[Union[EmailEvent, Failure]]:
    """One thread hop for several messages: each gets its event or the failure that stopped it."""
    results: list[Union[EmailEvent, Failure]] = []
    for chunks, envelope in items:
        try:
            results.append(parse_mail(unstuff(chunks), envelope, store))
        except Exception:
            results.append(Failure())
    return results


class MailIngest:
    """Turns received messages into published events; answers each with an SMTP reply.

    A message of at most ``inline_bytes`` with no file to store and no HTML body to convert
    is parsed at once: that costs less than any hop to a thread or a process. The others
    (big ones, those with attachments, and HTML-only ones) go to a mail parser process of
    ``parsers`` (:class:`ParserPool`), where a message that hangs or crashes the parser
    harms only that process and the parsing holds no lock the reactor needs. Without
    running parsers (``[mail] parsers = 0``, or while they start) they are parsed in the
    reactor's thread pool, at most ``jobs`` batches at a time: the GIL lets one thread
    parse at once, and a second covers a batch that waits on the disk. Messages that
    complete while the jobs run go together in the next batch, so one thread hop serves
    many messages under load.
    """

    def __init__(self, bus: Bus, store: Store, reactor: Any, jobs: int = 2,
                 batch_bytes: int = 4 << 20, batch_count: int = 128, inline_bytes: int = 32 << 10,
                 parsers: Optional[ParserPool] = None):
        self.inline_bytes = inline_bytes
        self.bus = bus
        self.store = store
        self.reactor = reactor
        self.parsers = parsers
        self.jobs = jobs
        self.batch_bytes = batch_bytes
        self.batch_count = batch_count
        self._batch: list[_Received] = []
        self._batch_size = 0
        self._flush_call: Any = None
        self._running = 0
        self.received = 0

    def deliver(self, chunks: list[bytes], size: int, envelope: Envelope) -> Deferred[tuple[int, bytes]]:
        """Fires with ``(code, text)``: 250 once the event is on the bus, 451 or 5xx otherwise."""
        d: Deferred[tuple[int, bytes]] = Deferred()
        if size <= self.inline_bytes:
            try:
                event = parse_mail(unstuff(chunks), envelope, NO_WRITES)  # type: ignore[arg-type]
            except NotOnReactor:
                pass
            except Exception:
                d.callback(self._refusal(Failure(), envelope))
                return d
            else:
                self._parsed([event], [(chunks, envelope, d)])
                return d
        if self.parsers is not None and self.parsers.running and self.parsers.ready_count():
            parsed = self.parsers.parse(chunks, size, envelope)
            parsed.addBoth(lambda result: self._parsed([result], [(chunks, envelope, d)]))
            return d
        self._batch.append((chunks, envelope, d))
        self._batch_size += size
        if self._flush_call is None and self._running < self.jobs:
            # messages that end in the same reactor turn share one thread hop
            self._flush_call = self.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_call = None
        while self._batch and self._running < self.jobs:
            take, size = 0, 0
            while take < len(self._batch) and take < self.batch_count and (take == 0 or size < self.batch_bytes):
                size += sum(len(c) for c in self._batch[take][0])
                take += 1
            batch, self._batch = self._batch[:take], self._batch[take:]
            self._batch_size -= size
            self._running += 1
            job = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), parse_job,
                                            [(chunks, envelope) for chunks, envelope, _ in batch], self.store)
            job.addCallbacks(self._parsed, self._job_failed, callbackArgs=(batch,), errbackArgs=(batch,))
            job.addBoth(self._job_done)

    def _job_done(self, _: Any) -> None:
        self._running -= 1
        if self._batch and self._flush_call is None:
            self._flush()

    def _job_failed(self, failure: Failure, batch: list[_Received]) -> None:
        self._parsed([failure] * len(batch), batch)

    def _parsed(self, results: Sequence[Union[EmailEvent, Failure]], batch: list[_Received]) -> None:
        for result, (_, envelope, d) in zip(results, batch):
            if isinstance(result, Failure):
                d.callback(self._refusal(result, envelope))
                continue
            result.epoch = int(self.reactor.seconds())  # a mail carries no epoch: it is when it came
            published = self.bus.publish(result).addCallbacks(self._published, self._not_published,
                                                              callbackArgs=(result, envelope), errbackArgs=(envelope,))
            published.chainDeferred(d)

    def _published(self, entry_id: Any, event: EmailEvent, envelope: Envelope) -> tuple[int, bytes]:
        self.received += 1
        log.info("mail from {sender} to {recipients} published as {guid} with {count} attachments",
                 sender=envelope.sender, recipients=envelope.recipients, guid=event.guid,
                 count=len(event.attachments))
        return 250, f"2.0.0 Accepted as {event.guid}".encode()

    def _not_published(self, failure: Failure, envelope: Envelope) -> tuple[int, bytes]:
        if failure.check(BusUnavailable):
            log.warn("mail from {sender} refused for now, the bus is unavailable: {error}",
                     sender=envelope.sender, error=failure.getErrorMessage())
            return 451, b"4.3.0 The event bus is unavailable; please try again later"
        log.failure("mail from {sender} could not be published", failure, sender=envelope.sender)
        return 451, b"4.3.0 Local error while publishing; please try again later"

    def _refusal(self, failure: Failure, envelope: Envelope) -> tuple[int, bytes]:
        if failure.check(MessageRefused):
            return failure.value.code, failure.value.text.encode()
        if failure.check(OSError):
            log.failure("mail from {sender}: the store could not write an attachment", failure,
                        sender=envelope.sender)
            return 451, b"4.3.0 Attachments cannot be stored right now; please try again later"
        if failure.check(ParserUnavailable):
            log.warn("mail from {sender} refused for now: {error}", sender=envelope.sender,
                     error=failure.getErrorMessage())
            return 451, b"4.3.0 The message could not be parsed right now; please try again later"
        log.failure("mail from {sender} could not be parsed", failure, sender=envelope.sender)
        return 554, b"5.6.0 The message could not be parsed"


@implementer(smtp.IMessageDelivery)
class _Submitter:
    """The avatar of an authenticated client; delivery itself is the protocol's business."""

    def __init__(self, username: str):
        self.username = username

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: smtp.Address,  # pragma: no cover - not used by our DATA
                       recipients: list[smtp.User]) -> None:
        return None

    def validateFrom(self, helo: tuple[bytes, bytes],  # pragma: no cover - the protocol validates
                     origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], None]:  # pragma: no cover - the protocol validates
        return lambda: None


@implementer(IRealm)
class _SubmitterRealm:
    def requestAvatar(self, avatar_id: Any, mind: Any,
                      *interfaces: Any) -> tuple[type[smtp.IMessageDelivery], _Submitter, Callable[[], None]]:
        name = avatar_id.decode("utf-8", "replace") if isinstance(avatar_id, bytes) else str(avatar_id)
        return smtp.IMessageDelivery, _Submitter(name), lambda: None


@implementer(ICredentialsChecker)
class _UserChecker:
    """``[mail] users`` (name -> password), compared in constant time."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[str, str]):
        self.users = {name.encode(): password.encode() for name, password in users.items()}

    def requestAvatarId(self, credentials: Any) -> Deferred[Union[bytes, tuple[()]]]:
        username = credentials.username or b""
        password = credentials.password or b""
        expected = self.users.get(username)
        if expected is not None and hmac.compare_digest(expected, password):
            return defer.succeed(username)
        return defer.fail(cred_error.UnauthorizedLogin())


def peer_key(host: str) -> str:
    """What AUTH failures are counted by: the address, or for IPv6 its /64 (one site's, usually)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class PeerAuthFailures:
    """Failed AUTHs per client address (:func:`peer_key`), counted in windows of ``window`` seconds.

    An address with ``limit`` failures in its window is refused until that window ends; a
    ``limit`` of 0 counts nothing. At most ``max_peers`` addresses are kept, in the order
    their windows began: the expired ones go first, and the oldest one when there are too many.
    """

    def __init__(self, limit: int, window: float, clock: Any, max_peers: int = MAX_TRACKED_PEERS):
        self.limit = limit
        self.window = window
        self.clock = clock
        self.max_peers = max_peers
        self._peers: dict[str, list[float]] = {}  # key -> [failures, end of the window]

    def blocked(self, host: str) -> bool:
        entry = self._peers.get(peer_key(host)) if self.limit else None
        return entry is not None and entry[0] >= self.limit and entry[1] > self.clock.seconds()

    def record(self, host: str) -> int:
        """Count a failure from ``host``; returns its failures in the current window (0: not counted)."""
        if not self.limit:
            return 0
        now = self.clock.seconds()
        while self._peers:
            oldest = next(iter(self._peers))
            if self._peers[oldest][1] > now:
                break
            del self._peers[oldest]
        key = peer_key(host)
        entry = self._peers.get(key)
        if entry is None or entry[1] <= now:  # the latter only when the clock went back
            self._peers.pop(key, None)
            if len(self._peers) >= self.max_peers:
                del self._peers[next(iter(self._peers))]
            entry = self._peers[key] = [0, now + self.window]
        entry[0] += 1
        return int(entry[0])


class IncomingSMTP(smtp.ESMTP):
    """Twisted's ESMTP with SIZE, 8BITMIME, AUTH only under TLS, domain checks and streamed DATA."""

    timeout = 300
    portal: Optional[Portal]  # type: ignore[assignment]  # twisted types its class attribute as None
    # a TCP or TLS connection: its own push producer, with ``disconnecting`` and ``disconnected``,
    # which no one interface of Twisted declares
    transport: Any
    host: bytes  # the name it greets with; Twisted's SMTP sets it untyped

    if TYPE_CHECKING:
        # Twisted's own, unannotated: its type, for the checker only, so that every reply is checked
        def sendCode(self, code: int, message: bytes = b"") -> None: ...

    def __init__(self, factory: "IncomingMailFactory"):
        challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials} if factory.portal else {}
        super().__init__(challengers, factory.tls)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.mail_factory = factory
        self.portal = factory.portal
        self.host = factory.mail.hostname.encode("idna") if factory.mail.hostname.isascii() \
            else factory.mail.hostname.encode("utf-8")
        self.user: Optional[str] = None
        self._auth_failures = 0
        self._auth_answer: Any = None  # the delayed answer to a failed AUTH
        self._pending = b""  # received bytes not yet handled (commands, or data before 354 was sent)
        self._busy = False  # a message, or an AUTH, is being answered: later input waits
        self._handling = False  # _handle_pending is running
        self._paused = False  # reading stopped: too much input waits behind a busy message
        self._tls_just_started = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._tail = b""
        self._too_big = False
        self._envelope: Optional[Envelope] = None
        self.closed: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if ISSLTransport.providedBy(self.transport):
            self.startedTLS = True  # a listener on ssl:465 is encrypted from the start

    # -- the advertised extensions ------------------------------------------------
    def greeting(self) -> bytes:
        return self.host + b" ESMTP cockpit"

    def extensions(self) -> dict[bytes, Optional[list[bytes]]]:
        ext: dict[bytes, Optional[list[bytes]]] = {
            b"SIZE": [str(self.mail_factory.mail.max_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self.startedTLS and self.challengers and not self.authenticated:
            ext[b"AUTH"] = list(self.challengers)  # never over plain text
        return ext

    def ext_STARTTLS(self, rest: bytes) -> None:
        super().ext_STARTTLS(rest)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self.startedTLS:
            # RFC 3207: forget the plain-text dialogue, and any plain text pipelined behind STARTTLS
            self._tls_just_started = True
            self._helo = (None, self._helo[1] if self._helo else b"")
            self._from = None
            self._to = []

    # -- AUTH ---------------------------------------------------------------------
    # Twisted's ext_AUTH and state_AUTH, with replies that say what went wrong, and with the
    # outcome of the check awaited before any later command is read: a failed one is answered
    # after a delay that doubles with each failure on the connection, the last one allowed
    # (``[mail] auth_failures``) with 421 and the end of the connection.
    def ext_AUTH(self, rest: bytes) -> None:
        mechanism, _, initial = rest.strip().partition(b" ")
        challenger = self.challengers.get(mechanism.upper())
        if not self.challengers:
            self.sendCode(502, b"5.5.1 AUTH is not enabled on this server")
        elif not self.startedTLS:
            self.sendCode(538, b"5.7.11 Encryption required: issue STARTTLS first")
        elif self.authenticated:
            self.sendCode(503, b"5.5.1 Already authenticated")
        elif challenger is None:
            self.sendCode(504 if mechanism else 501, b"5.5.4 AUTH takes a mechanism this server offers: "
                          + b" ".join(self.challengers))
        elif not self._peer_blocked():
            self.mode = smtp.AUTH
            self.challenger = challenger()
            initial = initial.strip()
            if initial:
                self.challenger.getChallenge()  # the one the initial response answers
            self.state_AUTH(initial or None)

    def state_AUTH(self, response: Optional[bytes]) -> None:
        if response is None:
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
            return
        if response == b"*":
            self._end_auth(501, b"5.7.0 Authentication aborted")
            return
        try:
            # "=" is the empty initial response (RFC 4954)
            self.challenger.setResponse(b"" if response == b"=" else base64.b64decode(response, validate=True))
        except Exception:  # not base64, or PLAIN without its two NULs
            self._end_auth(501, b"5.5.2 Malformed authentication response")
            return
        if self.challenger.moreChallenges():
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
            return
        credentials = self.challenger
        self._end_auth()
        if self._peer_blocked():
            return
        self._busy = True
        assert self.portal is not None  # AUTH is offered only with a portal
        checked = self.portal.login(credentials, None, smtp.IMessageDeliveryFactory, smtp.IMessageDelivery)
        checked.addCallbacks(self._cbAuthenticated, self._ebAuthenticated, errbackArgs=(credentials,))
        checked.addErrback(self._auth_crashed)

    def callLater(self, period: float, func: Callable[..., Any], *args: Any) -> Any:
        """The factory's clock: the idle timeout's, and the delay of a failed AUTH's answer."""
        return self.mail_factory.clock.callLater(period, func, *args)

    def _end_auth(self, code: Optional[int] = None, text: bytes = b"") -> None:
        self.challenger = None
        self.mode = smtp.COMMAND
        if code is not None:
            self.sendCode(code, text)

    def _peer_blocked(self) -> bool:
        """Refuses AUTH with 454 while this client's address has too many failures behind it."""
        if not self.mail_factory.peer_failures.blocked(self._peer()):
            return False
        self.sendCode(454, b"4.7.0 Too many failed authentication attempts from your address; "
                      b"try again later")
        return True

    def _cbAuthenticated(self, loginInfo: Any) -> None:
        super()._cbAuthenticated(loginInfo)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.user = loginInfo[1].username
        log.info("SMTP client {peer} authenticated as {user}", peer=self._peer(), user=self.user)
        if self._connected():
            self.sendCode(235, b"2.7.0 Authentication successful")
            self._resume()

    def _ebAuthenticated(self, reason: Failure, credentials: Any = None) -> None:
        if not reason.check(cred_error.UnauthorizedLogin):
            log.failure("SMTP AUTH from {peer}: the credentials could not be checked", reason, peer=self._peer())
            if self._connected():
                self.sendCode(454, b"4.7.0 Temporary authentication failure; try again later")
                self._resume()
            return
        self._auth_failures += 1
        peer, limit = self._peer(), self.mail_factory.mail.auth_failures
        name = getattr(credentials, "username", None) or b""
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        from_peer = self.mail_factory.peer_failures.record(peer)
        log.warn("SMTP AUTH failed for user {user!r} from {peer}: {count} of {limit} failures allowed on "
                 "this connection", user=clean_text(str(name))[:200], peer=peer,
                 count=self._auth_failures, limit=limit)
        if from_peer == self.mail_factory.peer_failures.limit:
            log.warn("SMTP AUTH from {peer} is refused for the next {window:.0f} s after {count} failures",
                     peer=peer_key(peer), window=self.mail_factory.peer_failures.window, count=from_peer)
        delay = doubling(self.mail_factory.mail.auth_delay, self._auth_failures, MAX_AUTH_DELAY)
        if self._connected():
            self._auth_answer = self.callLater(delay, self._answer_failed_auth, self._auth_failures >= limit)

    def _answer_failed_auth(self, last: bool) -> None:
        self._auth_answer = None
        if not last:
            self.sendCode(535, b"5.7.8 Authentication credentials invalid")
            self._resume()
            return
        log.warn("SMTP client {peer} disconnected after {count} failed AUTH attempts",
                 peer=self._peer(), count=self._auth_failures)
        self.sendCode(421, b"4.7.0 " + self.host + b" Too many failed authentication attempts, "
                      b"closing the connection")
        self.transport.loseConnection()

    def _auth_crashed(self, failure: Failure) -> None:
        log.failure("SMTP AUTH from {peer} failed unexpectedly", failure, peer=self._peer())
        if self._connected():
            self.transport.abortConnection()

    def _peer(self) -> str:
        try:
            return str(self.transport.getPeer().host)
        except Exception:
            return "?"

    # -- envelope ---------------------------------------------------------------
    # MAIL and RCPT as Twisted's SMTP answers them, with the same replies, but checked at
    # once: our checks never wait, so they need no Deferred per command.
    def do_MAIL(self, rest: bytes) -> None:
        if self._from:
            self.sendCode(503, b"Only one sender per message, please")
            return
        self._to = []
        match = self.mail_re.match(rest)
        if not match:
            self.sendCode(501, b"Syntax error")
            return
        for option in (match.group("opts") or b"").split():
            key, _, value = option.partition(b"=")
            if key.upper() == b"SIZE" and value.isdigit() and int(value) > self.mail_factory.mail.max_size:
                self.mail_factory.metrics.smtp(552)
                self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size (%d bytes)"
                              % self.mail_factory.mail.max_size)
                return
        try:
            # Twisted's own, unannotated
            self._from = smtp.Address(match.group("path"), self.host)  # type: ignore[no-untyped-call]
        except smtp.AddressError as exc:
            self.sendCode(553, str(exc).encode("utf-8", "replace"))
            return
        self.sendCode(250, b"Sender address accepted")  # any sender: the recipients decide

    def do_RCPT(self, rest: bytes) -> None:
        if not self._from:
            self.sendCode(503, b"Must have sender before recipient")
            return
        match = self.rcpt_re.match(rest)
        if not match:
            self.sendCode(501, b"Syntax error")
            return
        try:
            # Twisted's own, unannotated
            user = smtp.User(match.group("path"), self._helo, self, self._from)  # type: ignore[no-untyped-call]
        except smtp.AddressError as exc:
            self.sendCode(553, str(exc).encode("utf-8", "replace"))
            return
        try:
            accepted = self.validateTo(user)
        except smtp.SMTPServerError as exc:  # SMTPBadRcpt too
            self.sendCode(exc.code, str(exc.resp).encode("utf-8", "replace"))
            return
        self._to.append((user, accepted))
        self.sendCode(250, b"Recipient address accepted")

    def validateTo(self, user: smtp.User) -> Callable[[], None]:
        if len(self._to) >= MAX_RECIPIENTS:
            # Twisted's own, unannotated
            raise smtp.SMTPServerError(452, "4.5.3 Too many recipients")  # type: ignore[no-untyped-call]
        domains = self.mail_factory.domains
        domain = user.dest.domain.decode("utf-8", "replace").lower().rstrip(".")
        if domains and domain not in domains:
            # Twisted's own, unannotated
            raise smtp.SMTPBadRcpt(str(user.dest), 550,  # type: ignore[no-untyped-call]
                                   f"5.1.1 <{user.dest}>: recipient not accepted here, "
                                   f"this server takes mail for {', '.join(sorted(domains))}")
        return lambda: None

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 OK")  # RFC 5321 4.5.1: every server has it; Twisted's has not

    def do_HELP(self, rest: bytes) -> None:
        """RFC 5321 4.1.1.8: what this server takes, whatever the topic asked about."""
        self.sendCode(214, b"2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
                      + (b" STARTTLS" if self.canStartTLS and not self.startedTLS else b"")
                      + (b" AUTH" if self.startedTLS and self.challengers else b""))

    def do_VRFY(self, rest: bytes) -> None:
        """RFC 5321 3.5.3: 252, since saying which addresses exist would help only address harvesters."""
        if not rest.strip():
            self.sendCode(501, b"5.5.4 VRFY takes a user or mailbox name")
            return
        self.sendCode(252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    # -- input ------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self.mode == RAWDATA:
            self._data_received(data)
            return
        self._pending += data
        if self._busy:
            if len(self._pending) > MAX_WAITING and not self._paused:
                # Reading stops only when this much waits: stopping and restarting it for
                # every message would cost two epoll calls per mail.
                self._paused = True
                self.transport.pauseProducing()
            return
        self._handle_pending()

    def _handle_pending(self) -> None:
        if self._handling:
            # an answer that came at once, from within the loop below: the loop goes on, so
            # that a client sending many commands in one go does not deepen the stack with each
            return
        self._handling = True
        try:
            self._handle_pending_input()
        finally:
            self._handling = False

    def _handle_pending_input(self) -> None:
        while not self._busy and not self.transport.disconnecting:
            if self.mode == RAWDATA:
                data, self._pending = self._pending, b""
                if not data:
                    return
                self._data_received(data)
                continue
            end = self._pending.find(b"\r\n")
            if end < 0:
                break
            line, self._pending = self._pending[:end], self._pending[end + 2:]
            if len(line) > MAX_COMMAND_LINE:
                self.lineLengthExceeded(line)
                return
            self.lineReceived(line)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
            if self._tls_just_started:
                self._tls_just_started = False
                self._pending = b""
                return
        if len(self._pending) > MAX_COMMAND_LINE and self.mode != RAWDATA:
            self.lineLengthExceeded(self._pending)

    def lineLengthExceeded(self, line: bytes) -> None:
        # without a line end there is no knowing where the next command starts
        self._pending = b""
        self.sendCode(500, b"5.5.2 Line too long")
        self.transport.loseConnection()

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 Must have valid receiver and originator")
            return
        self._envelope = Envelope(sender=str(self._from), recipients=[str(user.dest) for user, _ in self._to])
        self._from = None
        self._to = []
        self.mode = RAWDATA
        self._chunks = []
        self._size = 0
        self._tail = b"\r\n"  # the CRLF that ended DATA: a first line of "." ends an empty message
        self._too_big = False
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _data_received(self, data: bytes) -> None:
        """Collect the message as chunks; past max_size, only look for its end."""
        window = self._tail + data
        end = window.find(b"\r\n.\r\n")
        if end < 0:
            self._keep(data)
            self._tail = window[-4:]
            return
        cut = end + 2 - len(self._tail)  # where the message ends within ``data`` (CRLF included)
        if cut >= 0:
            self._keep(data[:cut])
        elif not self._too_big:
            # the end marker began in the previous chunk: take back what was kept of it
            drop = -cut
            while drop and self._chunks:
                last = self._chunks.pop()
                if len(last) > drop:
                    self._chunks.append(last[:-drop])
                    drop = 0
                else:
                    drop -= len(last)
        rest = window[end + 5:]
        self.mode = smtp.COMMAND
        self._pending = rest + self._pending
        self._message_complete()

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        if self._too_big:
            return
        if self._size > self.mail_factory.mail.max_size:
            self._too_big = True
            self._chunks = []  # memory stays bounded: nothing more is kept of this message
            return
        if data:
            self._chunks.append(data)

    def _message_complete(self) -> None:
        envelope, self._envelope = self._envelope, None
        chunks, self._chunks = self._chunks, []
        if self._too_big or envelope is None:
            self.mail_factory.metrics.smtp(552)
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size (%d bytes)"
                          % self.mail_factory.mail.max_size)
            self._handle_pending()
            return
        self._busy = True
        d = self.mail_factory.ingest.deliver(chunks, self._size, envelope)
        d.addErrback(self._delivery_crashed)
        d.addCallback(self._answer)

    def _delivery_crashed(self, failure: Failure) -> tuple[int, bytes]:
        log.failure("mail delivery failed unexpectedly", failure)
        return 451, b"4.3.0 Local error in processing; please try again later"

    def _answer(self, reply: tuple[int, bytes]) -> None:
        self.mail_factory.metrics.smtp(reply[0])
        self._busy = False
        if not self._connected():
            return
        self.sendCode(*reply)
        self._resume()

    def _connected(self) -> bool:
        return self.transport is not None and not self.transport.disconnected

    def _resume(self) -> None:
        """Go on with the input that waited while the last command was answered."""
        self._busy = False
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._handle_pending()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.mode = smtp.COMMAND  # nothing of a half-received message is kept
        self._chunks = []
        if self._auth_answer is not None and self._auth_answer.active():
            self._auth_answer.cancel()
        self._auth_answer = None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.mail_factory.connections.discard(self)
        closed, self.closed = self.closed, []
        for d in closed:
            d.callback(None)

    def when_closed(self) -> Deferred[None]:
        """Fires once this connection is gone."""
        if self.transport is None or getattr(self.transport, "disconnected", False):
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self.closed.append(d)
        return d


class IncomingMailFactory(protocol.ServerFactory):
    """The SMTP listener's factory, built from ``[mail]``, the bus and the store."""

    protocol = IncomingSMTP
    noisy = False
    metrics: Any = NO_METRICS  # cockpit.metrics: each message's answer is counted

    def __init__(self, mail: MailSection, bus: Bus, store: Store, reactor: Any,
                 parsers: Optional[ParserPool] = None, clock: Any = None):
        self.clock = clock if clock is not None else reactor  # the connections' timers
        self.mail = mail
        self.domains = frozenset(d.lower().rstrip(".") for d in mail.domains)
        self.ingest = MailIngest(bus, store, reactor, parsers=parsers)
        self.tls = server_tls(mail) if mail.tls_cert else None
        self.connections: set[IncomingSMTP] = set()
        self.peer_failures = PeerAuthFailures(mail.auth_peer_failures, mail.auth_peer_window, self.clock)
        self.portal = Portal(_SubmitterRealm(), [_UserChecker(mail.users)]) if mail.users and self.tls else None

    def buildProtocol(self, addr: Any) -> IncomingSMTP:
        p = IncomingSMTP(self)
        p.factory = self
        self.connections.add(p)
        return p

    def when_idle(self) -> Deferred[list[None]]:
        """Fires once every open connection has closed (for an orderly stop)."""
        return defer.gatherResults([p.when_closed() for p in list(self.connections)])


def server_tls(mail: MailSection) -> Any:
    """The STARTTLS context of ``[mail] tls_cert`` (and ``tls_key``); exits with one line if unusable."""
    from twisted.internet import ssl

    try:
        pem = Path(mail.tls_cert).read_bytes()  # type: ignore[arg-type]
        if mail.tls_key:
            pem += b"\n" + Path(mail.tls_key).read_bytes()
        # Twisted's own, unannotated
        return ssl.PrivateCertificate.loadPEM(pem).options()  # type: ignore[no-untyped-call]
    except Exception as exc:  # OSError, or OpenSSL's opinion of the PEM
        raise SystemExit(f"cockpit: [mail] tls_cert: cannot use {mail.tls_cert} "
                         f"(with tls_key {mail.tls_key}) for STARTTLS: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Sending.
# ---------------------------------------------------------------------------------------------

_ADDRESS_RE = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@[^\s@<>()\[\],;:\"\\]+$")


def _check_address(value: str) -> str:
    value = value.strip()
    if not _ADDRESS_RE.match(value) or len(value) > 320:
        raise ValueError(f"expected a plain address such as ops@example.com, got {value!r}")
    return value


class OutgoingMail(BaseModel):
    """A mail for the relay: the body of ``POST /api/mail`` and of ``service.send_mail``."""

    model_config = ConfigDict(extra="forbid")

    to: list[str] = Field(min_length=1, max_length=MAX_RECIPIENTS, description="recipient addresses")
    cc: list[str] = Field(default=[], max_length=MAX_RECIPIENTS)
    subject: str = Field(max_length=998)
    body: str = Field(max_length=10 * 1024 * 1024)
    bodytype: Literal["text", "md", "html"] = "text"

    @field_validator("to", "cc")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_check_address(address) for address in value]

    @field_validator("subject")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # a subject is one header line: folding it is the library's job, not the caller's
        return " ".join(value.split())


def build_message(mail: OutgoingMail, sender: str, message_id: str, now: float) -> EmailMessage:
    """The message to relay; ``now`` (seconds since 1970) is its Date."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(mail.to)
    if mail.cc:
        msg["Cc"] = ", ".join(mail.cc)
    msg["Subject"] = mail.subject
    msg["Date"] = format_datetime(datetime.datetime.fromtimestamp(now, datetime.timezone.utc))
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"
    if mail.bodytype == "html":
        msg.set_content(markdownify(mail.body, heading_style="ATX"))
        msg.add_alternative(mail.body, subtype="html")
    else:
        msg.set_content(mail.body)
    return msg


# what the relay's answer fires with: how many recipients it took, and (address, code, reply) for each
_Sent = tuple[int, list[Any]]


@dataclass
class _Delivering:
    """A mail this process is delivering: its next attempt's timer, or the attempt under way."""

    mail: QueuedMail
    done: Deferred[Any]  # fires once the outbox has booked the mail finished or suspended
    timer: Any = None
    attempt: Optional[Deferred[_Sent]] = None
    stopping: bool = False


class MailSender(Service):
    """Delivers :class:`OutgoingMail` through ``[mail.relay]``, retrying with backoff.

    A mail is stored in the :class:`~cockpit.outbox.Outbox` before :meth:`send` fires, and
    stays there until it is sent or has failed: a stop or a crash does not lose it.
    """

    def __init__(self, relay: RelaySection, reactor: Any, hostname: Optional[str] = None,
                 first_delay: float = 5.0, max_delay: float = 600.0, history: int = 500,
                 max_queued: int = 10000, concurrency: int = 4, *, outbox: Outbox):
        self.relay = relay
        self.reactor = reactor
        self.hostname = hostname or "localhost"
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.outbox = outbox
        self._slots = defer.DeferredSemaphore(concurrency)  # attempts under way at once
        self._delivering: dict[str, _Delivering] = {}
        self._watchers: dict[str, list[Deferred[dict[str, Any]]]] = {}
        self._schedule_watchers: dict[str, list[Deferred[float]]] = {}
        self._tls = self._client_tls() if (relay.starttls or relay.tls) else None

    def _client_tls(self) -> Any:
        from twisted.internet import ssl

        trust = None
        if self.relay.ca_cert:
            try:
                trust = ssl.Certificate.loadPEM(Path(self.relay.ca_cert).read_bytes())
            except Exception as exc:
                raise SystemExit(f"cockpit: [mail.relay] ca_cert: cannot use {self.relay.ca_cert}: {exc}") from None
        return ssl.optionsForClientTLS(self.relay.host, trustRoot=trust)

    # -- API ---------------------------------------------------------------------
    def send(self, mail: OutgoingMail) -> Deferred[dict[str, Any]]:
        """Store ``mail`` for the relay; fires with its delivery record once it is stored (not once delivered).

        Fails with MailQueueFull when too many mails wait, with BusUnavailable when it cannot be stored.
        """
        mail_id = uuid.uuid4().hex
        domain = self.relay.sender.rpartition("@")[2] or self.hostname
        message = build_message(mail, self.relay.sender, make_msgid(mail_id[:16], domain=domain),
                                self.reactor.seconds())
        raw = message.as_bytes(policy=email_policy.default)  # sendmail turns \n into CRLF itself
        record = {"id": mail_id, "to": list(mail.to), "cc": list(mail.cc), "subject": mail.subject,
                  "state": "queued", "attempts": 0, "error": None, "queued": self.reactor.seconds(), "sent": None,
                  "retry_at": None}
        accepted = dict(record)  # the delivery may begin before the caller hears of it

        def stored(_: Any) -> dict[str, Any]:
            log.info("mail {id} to {to} queued for {relay}", id=mail_id, to=record["to"], relay=self.relay.host)
            return accepted

        return self.outbox.add(QueuedMail(record, list(mail.to) + list(mail.cc), raw)).addCallback(stored)

    def deliveries(self, limit: int = 50) -> Deferred[list[dict[str, Any]]]:
        """Fires with the delivery records, newest first."""
        return self.outbox.records(limit)

    def get(self, mail_id: str) -> Deferred[Optional[dict[str, Any]]]:
        """Fires with the delivery record of ``mail_id``, or None."""
        return self.outbox.record(mail_id)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "relay": f"{self.relay.host}:{self.relay.port}", "queued": len(self._delivering)}

    # -- lifetime ----------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.outbox.start(self._take)

    def stopService(self) -> Deferred[list[tuple[bool, Any]]]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        stopped = self.outbox.stop()  # first: no more mail is handed out
        left = list(self._delivering.values())
        if left:
            log.info("stopping with {count} mails not yet delivered; they stay queued", count=len(left))
        for delivering in left:
            delivering.stopping = True
            if delivering.timer is not None and delivering.timer.active():
                delivering.timer.cancel()
            if delivering.attempt is not None:
                delivering.attempt.cancel()
            self._suspend(delivering)
        return defer.DeferredList([stopped, *(d.done for d in left)], consumeErrors=True)

    # -- delivery ----------------------------------------------------------------
    def _take(self, mail: QueuedMail) -> Deferred[Any]:
        """Deliver ``mail`` until it is sent, has failed, or this sender stops."""
        if not self.running:
            return defer.fail(RuntimeError("the mail sender is stopped"))
        if mail.id in self._delivering:  # handed out twice (a reclaim that raced its own heartbeat)
            return self._delivering[mail.id].done
        delivering = _Delivering(mail, Deferred())
        self._delivering[mail.id] = delivering
        retry_at = mail.record.get("retry_at")
        delay = min(max(retry_at - self.reactor.seconds(), 0.0), self.max_delay) if retry_at else 0.0
        self._schedule(delivering, delay)
        return delivering.done

    def _schedule(self, delivering: _Delivering, delay: float) -> None:
        if delay > 0:
            delivering.timer = self.reactor.callLater(delay, self._attempt, delivering)
        for d in self._schedule_watchers.pop(delivering.mail.id, []):
            d.callback(delay)
        if delay <= 0:
            self._attempt(delivering)

    def _attempt(self, delivering: _Delivering) -> None:
        delivering.timer = None
        if delivering.stopping:
            return
        d = delivering.attempt = self._slots.run(self._send_once, delivering)
        d.addCallbacks(self._sent, self._failed, callbackArgs=(delivering,), errbackArgs=(delivering,))

    def _send_once(self, delivering: _Delivering) -> Deferred[_Sent]:
        record = delivering.mail.record
        record["attempts"] += 1
        assert delivering.mail.raw is not None
        return self._deliver(delivering.mail.recipients, delivering.mail.raw)

    def _deliver(self, recipients: list[str], raw: bytes) -> Deferred[_Sent]:
        relay = self.relay
        result: Deferred[_Sent] = Deferred(lambda _: factory.currentProtocol.transport.abortConnection()
                                           if factory.currentProtocol else connector.disconnect())
        factory = smtp.ESMTPSenderFactory(  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
            relay.username.encode() if relay.username else None,
            relay.password.encode() if relay.password else None,
            relay.sender, [r.encode() for r in recipients], BytesIO(raw), result,
            retries=0, timeout=relay.timeout, contextFactory=self._tls,
            heloFallback=not (relay.starttls or relay.username),
            requireAuthentication=bool(relay.username),
            requireTransportSecurity=relay.starttls or relay.tls,
            hostname=relay.host)
        factory.domain = self.hostname.encode("idna")
        factory.noisy = False
        if relay.tls:
            connector = self.reactor.connectSSL(relay.host, relay.port, factory, self._tls,
                                                timeout=relay.timeout)
        else:
            connector = self.reactor.connectTCP(relay.host, relay.port, factory, timeout=relay.timeout)
        return result

    def _sent(self, result: Any, delivering: _Delivering) -> None:
        delivering.attempt = None
        if delivering.stopping:
            return  # sent after all, but already suspended: it goes out again (at least once)
        record = delivering.mail.record
        record.update(state="sent", sent=self.reactor.seconds(), error=None, retry_at=None)
        log.info("mail {id} to {to} delivered to {relay} after {attempts} attempts",
                 id=record["id"], to=record["to"], relay=self.relay.host, attempts=record["attempts"])
        self._finish(delivering, None)

    def _failed(self, failure: Failure, delivering: _Delivering) -> None:
        delivering.attempt = None
        if delivering.stopping:
            return
        record = delivering.mail.record
        error = failure.getErrorMessage()
        code = getattr(failure.value, "code", None)
        if isinstance(error, bytes):
            error = error.decode("utf-8", "replace")
        record["error"] = str(error)[:1000]
        permanent = isinstance(code, int) and 500 <= code < 600
        if permanent or record["attempts"] > self.relay.retries:
            record.update(state="failed", retry_at=None)
            log.error("mail {id} to {to} failed after {attempts} attempts: {error}",
                      id=record["id"], to=record["to"], attempts=record["attempts"], error=record["error"])
            self._finish(delivering, record["error"])
            return
        delay = doubling(self.first_delay, record["attempts"], self.max_delay)
        record["retry_at"] = self.reactor.seconds() + delay
        log.warn("mail {id}: relay {relay} failed ({error}); attempt {next} in {delay:.0f}s",
                 id=record["id"], relay=self.relay.host, error=record["error"], next=record["attempts"] + 1,
                 delay=delay)
        stored = self.outbox.update(dict(record))
        self._schedule(delivering, delay)
        # kept in memory meanwhile; it is stored again at the next outcome
        stored.addErrback(lambda f: log.warn("mail {id}: cannot store its record: {error}",
                                             id=record["id"], error=f.getErrorMessage()))
        stored.addBoth(lambda _: self._outcome(delivering))

    def _finish(self, delivering: _Delivering, dead_error: Optional[str]) -> None:
        self._delivering.pop(delivering.mail.id, None)
        booked = self.outbox.finish(delivering.mail, dead_error)

        def not_booked(failure: Failure) -> Failure:
            log.warn("mail {id}: cannot store that it is {state}: {error}; it may be sent again",
                     id=delivering.mail.id, state=delivering.mail.record["state"], error=failure.getErrorMessage())
            return failure

        booked.addErrback(not_booked)
        booked.addBoth(self._outcome_then, delivering)
        booked.chainDeferred(delivering.done)

    def _suspend(self, delivering: _Delivering) -> None:
        self._delivering.pop(delivering.mail.id, None)
        delivering.mail.record["state"] = "queued"
        self.outbox.suspend(delivering.mail).addErrback(
            self._not_suspended, delivering).chainDeferred(delivering.done)

    @staticmethod
    def _not_suspended(failure: Failure, delivering: _Delivering) -> Failure:
        if failure.check(Suspended):
            return failure  # tells the bus consumer to leave the entry pending; nothing went wrong
        log.warn("mail {id}: cannot store it for the next start: {error}; it stays pending",
                 id=delivering.mail.id, error=failure.getErrorMessage())
        return failure

    def _outcome_then(self, result: Any, delivering: _Delivering) -> Any:
        self._outcome(delivering)
        return result

    def _outcome(self, delivering: _Delivering) -> None:
        record = dict(delivering.mail.record)
        for d in self._watchers.pop(record["id"], []):
            d.callback(record)

    def next_outcome(self, mail_id: str) -> Deferred[dict[str, Any]]:
        """Fires with the record once the next delivery attempt of ``mail_id`` here has ended and is stored."""
        d: Deferred[dict[str, Any]] = Deferred()
        self._watchers.setdefault(mail_id, []).append(d)
        return d

    def next_schedule(self, mail_id: str) -> Deferred[float]:
        """Fires with the delay in seconds once the next attempt of ``mail_id`` is scheduled here."""
        d: Deferred[float] = Deferred()
        self._schedule_watchers.setdefault(mail_id, []).append(d)
        return d
