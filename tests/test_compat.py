"""What the cockpit uses inside Twisted and txredisapi: each still there, or a failure that names it.

An upgrade that moves one of these fails here, with the attribute in the message, before it
fails somewhere stranger (cockpit/compat.py, cockpit/backends/redis/txredis.py).
"""
from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.mail.interfaces import IChallengeResponse
from twisted.trial.unittest import TestCase

from cockpit.backends.redis import RedisBus
from cockpit.backends.redis.txredis import connections, reply_queue
from cockpit.compat import LOGINCredentials, PLAINCredentials
from cockpit.config import RedisSection
from tests.redis_server import shared_server


class TwistedInsidesTests(TestCase):
    def test_the_auth_challengers_are_still_in_twisted_mail_cred(self):
        for challenger in (PLAINCredentials, LOGINCredentials):
            self.assertTrue(IChallengeResponse.implementedBy(challenger),
                            f"twisted.mail._cred.{challenger.__name__} no longer implements IChallengeResponse")


class TxredisapiInsidesTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_a_factory_still_lists_its_connections_and_each_queues_its_replies(self):
        bus = RedisBus(RedisSection(url=shared_server().url), reactor=reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        yield bus.when_connected()
        factory = bus._factory
        self.assertTrue(hasattr(factory, "pool"), "txredisapi's factory no longer has .pool")
        [proto] = [p for p in connections(factory) if p.connected]
        self.assertTrue(hasattr(proto, "replyQueue"), "txredisapi's protocol no longer has .replyQueue")
        waiting = reply_queue(proto).get()
        self.assertIsInstance(waiting, Deferred)
        proto.transport.write(b"*1\r\n$4\r\nPING\r\n")
        self.assertEqual("PONG", (yield waiting))
