"""MailSender against a local relay sink that needs STARTTLS and AUTH (a twisted.mail ESMTP server)."""
from __future__ import annotations

import json
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from twisted.cred import error as cred_error
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from cockpit.bus import BusUnavailable
from cockpit.config import RelaySection
from cockpit.backends.embedded.outbox import SpoolOutbox
from cockpit.backends.redis.outbox import RedisOutbox
from cockpit.outbox import MAIL_GROUP, MAIL_STREAM
from cockpit.smtp import MailSender, OutgoingMail, build_message
from tests.redis_server import RedisServer, free_port, shared_server, started_bus
from tests.test_smtp import self_signed_cert


@implementer(smtp.IMessage)
class _Received:
    def __init__(self, sink: "RelaySink", recipient: str):
        self.sink = sink
        self.recipient = recipient
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred:
        self.sink.arrived(self.recipient, b"".join(line + b"\n" for line in self.lines))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, sink: "RelaySink", user: str):
        self.sink = sink
        self.user = user

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        if str(user.dest) in self.sink.refuse:
            raise smtp.SMTPBadRcpt(user.dest, 550, "5.1.1 no such user here")
        return lambda: _Received(self.sink, str(user.dest))


class _SinkProtocol(smtp.ESMTP):
    def connectionMade(self):
        super().connectionMade()
        self.startedTLS = ISSLTransport.providedBy(self.transport)  # implicit TLS, as on port 465

    def extensions(self):
        ext = super().extensions()
        if not self.startedTLS:
            ext.pop(b"AUTH", None)  # like any decent relay: no passwords in plain text
        return ext


class RelaySink:
    """A relay that takes mail only from ``cockpit``/``relaypw`` over TLS; records what arrives."""

    def __init__(self, cert: Path, refuse: frozenset[str] = frozenset()):
        self.refuse = refuse
        self.messages: list[tuple[str, bytes]] = []
        self._waiting: list[Deferred] = []
        self.protocols: list[_SinkProtocol] = []
        self.context = ssl.PrivateCertificate.loadPEM(cert.read_bytes()).options()
        sink = self

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatar_id, mind, *interfaces):
                if smtp.IMessageDelivery in interfaces:
                    return smtp.IMessageDelivery, _Delivery(sink, avatar_id), lambda: None
                raise cred_error.UnhandledCredentials()

        self.portal = Portal(Realm(), [InMemoryUsernamePasswordDatabaseDontUse(cockpit=b"relaypw")])

    def factory(self) -> protocol.ServerFactory:
        sink = self

        class Factory(protocol.ServerFactory):
            def buildProtocol(self, addr):
                p = _SinkProtocol({b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}, sink.context)
                p.portal = sink.portal
                p.host = b"relay.test"
                p.factory = self
                sink.protocols.append(p)
                return p
        return Factory()

    def arrived(self, recipient: str, data: bytes) -> None:
        self.messages.append((recipient, data))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.messages)

    def wait(self) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def wait_for(self, count: int) -> Deferred:
        """Fires once ``count`` messages have arrived in all."""
        if len(self.messages) >= count:
            return defer.succeed(self.messages)
        d = self.wait()
        d.addCallback(lambda _: self.wait_for(count))
        return d


class ClockedReactor:
    """The real reactor for connections, a Clock for the retry timers."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class SendingBehaviour:
    """What sending does whatever keeps the queue; subclasses say where (``make_outbox``)."""

    def setUp(self):
        self.cert = self_signed_cert(Path(self.mktemp()), host="localhost")
        self.sink = RelaySink(self.cert, refuse=frozenset({"ghost@example.org"}))
        self.clock = Clock()

    def make_outbox(self) -> Any:
        return SpoolOutbox(None, ClockedReactor(self.clock))  # in memory: a queue that needs no restart

    def listen(self, port: int = 0, implicit_tls: bool = False) -> int:
        if implicit_tls:
            listening = reactor.listenSSL(port, self.sink.factory(), self.sink.context, interface="127.0.0.1")
        else:
            listening = reactor.listenTCP(port, self.sink.factory(), interface="127.0.0.1")
        self.addCleanup(self.disconnect_all)
        self.addCleanup(listening.stopListening)
        return listening.getHost().port

    def disconnect_all(self):
        for p in self.sink.protocols:
            if p.transport is not None and not p.transport.disconnected:
                p.transport.abortConnection()

    def sender(self, port: int, start: bool = True, **relay: Any) -> MailSender:
        settings = RelaySection(**{"host": "localhost", "port": port, "username": "cockpit", "password": "relaypw",
                                   "starttls": True, "sender": "cockpit@cockpit.test", "ca_cert": str(self.cert),
                                   "timeout": 10.0, "retries": 3, **relay})
        sender = MailSender(settings, ClockedReactor(self.clock), hostname="cockpit.test", first_delay=5.0,
                            outbox=self.make_outbox())
        if start:
            sender.startService()
        self.addCleanup(lambda: sender.stopService() if sender.running else None)
        return sender

    @inlineCallbacks
    def test_mail_is_delivered_through_starttls_and_auth(self):
        port = self.listen()
        sender = self.sender(port)
        arrived = self.sink.wait()
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], cc=["boss@example.org"],
                                                subject="Deploy done", body="# Done\n\nall **green**",
                                                bodytype="md"))
        self.assertEqual((record["state"], record["to"], record["subject"]), ("queued", ["ops@example.org"],
                                                                             "Deploy done"))
        outcome = yield sender.next_outcome(record["id"])
        yield arrived
        self.assertEqual((outcome["state"], outcome["attempts"], outcome["error"]), ("sent", 1, None))
        self.assertEqual(sorted(r for r, _ in self.sink.messages), ["boss@example.org", "ops@example.org"])
        message = message_from_bytes(self.sink.messages[0][1], policy=policy.default)
        self.assertEqual(message["Subject"], "Deploy done")
        self.assertEqual(message["From"], "cockpit@cockpit.test")
        self.assertEqual(message.get_content(), "# Done\n\nall **green**\n")
        self.assertEqual((yield sender.deliveries())[0]["id"], record["id"])
        self.assertEqual((yield sender.get(record["id"]))["state"], "sent")
        self.assertTrue(self.sink.protocols[0].startedTLS)
        self.assertTrue(self.sink.protocols[0].authenticated)

    @inlineCallbacks
    def test_mail_is_delivered_over_implicit_tls(self):
        port = self.listen(implicit_tls=True)
        sender = self.sender(port, starttls=False, tls=True)
        arrived = self.sink.wait()
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="465", body="<p>hi <b>there</b></p>",
                                                bodytype="html"))
        outcome = yield sender.next_outcome(record["id"])
        yield arrived
        self.assertEqual(outcome["state"], "sent")
        message = message_from_bytes(self.sink.messages[0][1], policy=policy.default)
        self.assertEqual(message.get_content_type(), "multipart/alternative")
        self.assertIn("hi **there**", message.get_body(("plain",)).get_content())

    @inlineCallbacks
    def test_a_relay_that_is_down_is_retried_with_backoff_until_it_takes_the_mail(self):
        port = free_port()
        sender = self.sender(port)
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="retry", body="x"))
        first = yield sender.next_outcome(record["id"])
        self.assertEqual((first["state"], first["attempts"]), ("queued", 1))
        self.assertIn("connect", first["error"].lower())
        self.clock.advance(4.9)
        self.assertEqual((yield sender.get(record["id"]))["attempts"], 1)  # not before the backoff is over
        second_attempt = sender.next_outcome(record["id"])
        self.clock.advance(0.1)
        second = yield second_attempt
        self.assertEqual((second["state"], second["attempts"]), ("queued", 2))
        self.listen(port)  # the relay comes back
        arrived = self.sink.wait()
        third_attempt = sender.next_outcome(record["id"])
        self.clock.advance(10.0)  # the backoff doubled
        third = yield third_attempt
        yield arrived
        self.assertEqual((third["state"], third["attempts"], third["error"]), ("sent", 3, None))

    @inlineCallbacks
    def test_a_mail_fails_after_its_retries_are_used_up(self):
        sender = self.sender(free_port(), retries=1)
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="gone", body="x"))
        yield sender.next_outcome(record["id"])
        last = sender.next_outcome(record["id"])
        self.clock.advance(5.0)
        outcome = yield last
        self.assertEqual((outcome["state"], outcome["attempts"]), ("failed", 2))
        self.assertEqual((yield sender.get(record["id"]))["state"], "failed")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_a_permanent_refusal_fails_at_once(self):
        sender = self.sender(self.listen())
        record = yield sender.send(OutgoingMail(to=["ghost@example.org"], subject="nobody", body="x"))
        outcome = yield sender.next_outcome(record["id"])
        self.assertEqual((outcome["state"], outcome["attempts"]), ("failed", 1))
        self.assertIn("550", outcome["error"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_a_relay_with_an_untrusted_certificate_is_not_used(self):
        other = self_signed_cert(Path(self.mktemp()), host="localhost")
        sender = self.sender(self.listen(), ca_cert=str(other), retries=0)
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="mitm", body="secret"))
        outcome = yield sender.next_outcome(record["id"])
        self.assertEqual(outcome["state"], "failed")
        self.assertEqual(self.sink.messages, [])


class DurableSendingBehaviour(SendingBehaviour):
    """What a queue that outlives the sender adds."""

    @inlineCallbacks
    def test_a_mail_queued_while_the_relay_is_down_survives_a_restart_and_goes_out_once_it_is_up(self):
        port = free_port()
        sender = self.sender(port)
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="survivor", body="x"))
        first = yield sender.next_outcome(record["id"])
        self.assertEqual((first["state"], first["attempts"]), ("queued", 1))
        yield sender.stopService()

        self.listen(port)  # the relay comes back while no sender runs
        arrived = self.sink.wait()
        again = self.sender(port, start=False)
        scheduled = again.next_schedule(record["id"])
        again.startService()
        delay = yield scheduled
        self.assertTrue(0 < delay <= 5.0, delay)  # the backoff goes on where it was, not from scratch
        outcome = again.next_outcome(record["id"])
        self.clock.advance(delay)
        outcome = yield outcome
        yield arrived
        self.assertEqual((outcome["state"], outcome["attempts"]), ("sent", 2))
        self.assertEqual([r for r, _ in self.sink.messages], ["ops@example.org"])
        self.assertEqual([(r["id"], r["state"]) for r in (yield again.deliveries())], [(record["id"], "sent")])

    @inlineCallbacks
    def test_delivery_records_outlive_the_sender(self):
        sender = self.sender(self.listen())
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="kept", body="x"))
        yield sender.next_outcome(record["id"])
        yield sender.stopService()
        later = self.sender(free_port())
        self.assertEqual((yield later.get(record["id"]))["state"], "sent")
        self.assertEqual([r["id"] for r in (yield later.deliveries())], [record["id"]])


class MailSending(SendingBehaviour, TestCase):
    """A sender with no outbox of its own keeps its queue in memory."""


class SpooledMailSending(DurableSendingBehaviour, TestCase):
    def setUp(self):
        super().setUp()
        self.spool = Path(self.mktemp())

    def make_outbox(self) -> SpoolOutbox:
        return SpoolOutbox(self.spool, ClockedReactor(self.clock))

    @inlineCallbacks
    def test_the_mail_is_in_the_spool_before_send_fires(self):
        sender = self.sender(free_port(), start=False)
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="on disk", body="hello"))
        stored = json.loads((self.spool / f"{record['id']}.json").read_text())
        self.assertEqual((stored["record"]["state"], stored["recipients"]), ("queued", ["ops@example.org"]))
        self.assertIn("hello", stored["raw"])
        self.assertEqual([p.name for p in self.spool.iterdir()], [f"{record['id']}.json"])  # no .tmp left

    @inlineCallbacks
    def test_an_unwritable_spool_refuses_the_mail_with_bus_unavailable(self):
        self.spool.write_text("a file where the directory should be")
        sender = self.sender(free_port(), start=False)
        yield self.assertFailure(sender.send(OutgoingMail(to=["ops@example.org"], subject="s", body="b")),
                                 BusUnavailable)


class RedisMailSending(DurableSendingBehaviour, TestCase):
    @inlineCallbacks
    def setUp(self):
        super().setUp()
        server = shared_server()
        server.flush()
        self.bus = yield started_bus(self, url=server.url, timeout=2.0, claim_idle=30.0)

    def make_outbox(self) -> RedisOutbox:
        return RedisOutbox(self.bus)

    @inlineCallbacks
    def test_two_senders_on_one_redis_deliver_each_mail_once(self):
        port = self.listen()
        senders = [self.sender(port), self.sender(port)]
        ids = []
        outcomes = []
        for n in range(8):
            record = yield senders[n % 2].send(OutgoingMail(to=[f"ops{n}@example.org"], subject=f"m{n}", body="x"))
            ids.append(record["id"])
            outcomes.append(defer.DeferredList([s.next_outcome(record["id"]) for s in senders],
                                               fireOnOneCallback=True))
        yield defer.gatherResults(outcomes)
        # what each sender holds is not taken from it while it holds it: it keeps saying so
        for sender in senders:
            yield sender.outbox.consumer.reclaim()
        yield defer.gatherResults([s.stopService() for s in senders])
        self.assertEqual(sorted(r for r, _ in self.sink.messages), sorted(f"ops{n}@example.org" for n in range(8)))
        message_ids = [message_from_bytes(raw, policy=policy.default)["Message-ID"] for _, raw in self.sink.messages]
        self.assertEqual(len(set(message_ids)), 8)
        records = yield senders[0].deliveries()
        self.assertEqual(sorted((r["id"], r["state"], r["attempts"]) for r in records),
                         sorted((i, "sent", 1) for i in ids))
        self.assertEqual(int((yield self.bus.execute("XLEN", MAIL_STREAM))), 0)  # finished mails leave the stream

    @inlineCallbacks
    def test_a_held_mail_is_not_taken_by_the_other_sender_while_its_holder_lives(self):
        port = free_port()
        holder = self.sender(port)
        other = self.sender(port)
        record = yield holder.send(OutgoingMail(to=["ops@example.org"], subject="mine", body="x"))
        first = defer.DeferredList([s.next_outcome(record["id"]) for s in (holder, other)], fireOnOneCallback=True)
        (outcome, index) = yield first
        owner, bystander = (holder, other) if index == 0 else (other, holder)
        self.assertEqual(outcome["attempts"], 1)  # now it waits for its backoff, held by its owner
        entries = yield self.bus.execute("XPENDING", MAIL_STREAM, MAIL_GROUP, "-", "+", "10")
        yield self.bus.execute("XCLAIM", MAIL_STREAM, MAIL_GROUP, entries[0][1], "0", entries[0][0],
                               "IDLE", "100000", "JUSTID")  # as if it had been silent for long
        yield owner.outbox.consumer.reclaim()  # its heartbeat
        taken = yield bystander.outbox.consumer.reclaim()
        self.assertEqual(taken, 0)

    @inlineCallbacks
    def test_a_mail_left_by_a_crashed_sender_is_reclaimed_and_delivered(self):
        port = self.listen()
        crashed = self.sender(port, start=False)
        record = yield crashed.send(OutgoingMail(to=["ops@example.org"], subject="orphan", body="x"))
        # a process that read the mail and died before it finished
        yield self.bus.execute("XGROUP", "CREATE", MAIL_STREAM, MAIL_GROUP, "0", "MKSTREAM")
        yield self.bus.execute("XREADGROUP", "GROUP", MAIL_GROUP, "dead-process", "COUNT", "10",
                               "STREAMS", MAIL_STREAM, ">")
        entries = yield self.bus.execute("XPENDING", MAIL_STREAM, MAIL_GROUP, "-", "+", "10")
        yield self.bus.execute("XCLAIM", MAIL_STREAM, MAIL_GROUP, "dead-process", "0", entries[0][0],
                               "IDLE", "100000", "JUSTID")
        arrived = self.sink.wait()
        survivor = self.sender(port, start=False)
        outcome = survivor.next_outcome(record["id"])
        survivor.startService()  # takes over what is left at once, not a claim interval later
        self.assertEqual(((yield outcome)["state"], (yield arrived)[0][0]), ("sent", "ops@example.org"))

    @inlineCallbacks
    def test_a_mail_that_keeps_failing_ends_in_the_dead_letters(self):
        sender = self.sender(free_port(), retries=0)
        record = yield sender.send(OutgoingMail(to=["ops@example.org"], subject="doomed", body="x"))
        outcome = yield sender.next_outcome(record["id"])
        self.assertEqual(outcome["state"], "failed")
        dead = yield self.bus.dead_letters()
        self.assertEqual(len(dead), 1)
        fields = dead[0][1]
        self.assertEqual((fields["stream"], fields["group"]), (MAIL_STREAM, MAIL_GROUP))
        self.assertIn("connect", fields["error"].lower())
        self.assertEqual(json.loads(fields["event"])["id"], record["id"])
        self.assertEqual(int((yield self.bus.execute("XLEN", MAIL_STREAM))), 0)


class RedisDown(TestCase):
    @inlineCallbacks
    def test_send_fails_with_bus_unavailable_while_redis_is_down(self):
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        bus = yield started_bus(self, url=redis.url, timeout=2.0)
        redis.stop()
        yield bus.when_disconnected()
        sender = MailSender(RelaySection(host="127.0.0.1", port=9), reactor, outbox=RedisOutbox(bus))
        yield self.assertFailure(sender.send(OutgoingMail(to=["ops@example.org"], subject="s", body="b")),
                                 BusUnavailable)


class OutgoingMailModel(TestCase):
    def test_a_mail_is_dated_by_the_time_it_is_given(self):
        message = build_message(OutgoingMail(to=["ops@example.org"], subject="s", body="b"), "cockpit@cockpit.test",
                                "<1@cockpit.test>", 1_700_000_000.0)
        self.assertEqual("Tue, 14 Nov 2023 22:13:20 +0000", message["Date"])

    def test_recipients_must_be_plain_addresses(self):
        for to in ([], ["not an address"], ["a@b.c\r\nBcc: x@y.z"], ["<a@b.c>"]):
            self.assertRaises(ValidationError, OutgoingMail, to=to, subject="s", body="b")

    def test_a_subject_is_folded_to_one_line(self):
        mail = OutgoingMail(to=["a@b.c"], subject="two\r\nBcc: x@y.z", body="b")
        self.assertEqual(mail.subject, "two Bcc: x@y.z")

    def test_bodytype_is_text_md_or_html(self):
        self.assertEqual(OutgoingMail(to=["a@b.c"], subject="s", body="b").bodytype, "text")
        self.assertRaises(ValidationError, OutgoingMail, to=["a@b.c"], subject="s", body="b", bodytype="rtf")
