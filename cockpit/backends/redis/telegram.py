"""The Telegram bot's shared state in Redis: offset, users' repos and refusals, and the polling lease.

Keys: ``ckpt.telegram.<what>.<bot id>`` (offset, repo, refused, lease).
"""
from __future__ import annotations

import uuid
from typing import Any, Generator, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit.backends.redis.bus import RedisBus
from cockpit.telegram_poll import BotState, Lease

log = Logger()

KEY_PREFIX = "ckpt.telegram."


def redis_key(bot_id: str, what: str) -> str:
    """The Redis key of one piece of a bot's state: ``ckpt.telegram.<what>.<bot id>``."""
    return f"{KEY_PREFIX}{what}.{bot_id}"


class RedisBotState(BotState):
    """State in Redis: ``ckpt.telegram.offset.<bot>`` (string), ``.repo.<bot>`` (hash by user id),
    ``.refused.<bot>`` (set of user ids)."""

    def __init__(self, bus: RedisBus, bot_id: str):
        self.bus = bus
        self.offset_key = redis_key(bot_id, "offset")
        self.repo_key = redis_key(bot_id, "repo")
        self.refused_key = redis_key(bot_id, "refused")

    def offset(self) -> Deferred[Optional[int]]:
        return self.bus.execute("GET", self.offset_key).addCallback(lambda v: int(v) if v else None)

    def save_offset(self, offset: int) -> Deferred[None]:
        return self.bus.execute("SET", self.offset_key, str(offset))

    def current_repo(self, user_id: int) -> Deferred[Optional[str]]:
        return self.bus.execute("HGET", self.repo_key, str(user_id)).addCallback(lambda v: v or None)

    def set_current_repo(self, user_id: int, repo: Optional[str]) -> Deferred[None]:
        if repo is None:
            return self.bus.execute("HDEL", self.repo_key, str(user_id))
        return self.bus.execute("HSET", self.repo_key, str(user_id), repo)

    def first_refusal(self, user_id: int) -> Deferred[bool]:
        return self.bus.execute("SADD", self.refused_key, str(user_id)).addCallback(lambda n: int(n) == 1)


_RENEW = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
          "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) else return 0 end")


class RedisLease(Lease):
    """A lease on polling one bot token: ``SET key holder NX PX ttl``, renewed by its holder."""

    def __init__(self, bus: RedisBus, bot_id: str, clock: IReactorTime, ttl: float = 30.0):
        self.bus = bus
        self.key = redis_key(bot_id, "lease")
        self.clock = clock
        self.ttl = ttl
        self.holder = uuid.uuid4().hex
        self.valid_until = 0.0

    @property
    def held(self) -> bool:
        return self.clock.seconds() < self.valid_until

    def _granted(self, asked_at: float) -> bool:
        # a margin, so that this process stops before another can take over
        self.valid_until = asked_at + self.ttl * 2 / 3
        return True

    @inlineCallbacks
    def acquire(self) -> Generator[Deferred[Any], Any, bool]:
        """Fires with whether this process holds the lease now."""
        asked_at = self.clock.seconds()
        reply = yield self.bus.execute("SET", self.key, self.holder, "NX", "PX", str(int(self.ttl * 1000)))
        if reply is not None and str(reply).upper() == "OK":
            return self._granted(asked_at)
        held: bool = yield self.renew()
        return held

    @inlineCallbacks
    def renew(self) -> Generator[Deferred[Any], Any, bool]:
        """Fires with whether this process still holds the lease (and extends it if so)."""
        asked_at = self.clock.seconds()
        reply = yield self.bus.execute("EVAL", _RENEW, "1", self.key, self.holder, str(int(self.ttl * 1000)))
        if int(reply) == 1:
            return self._granted(asked_at)
        self.valid_until = 0.0
        return False

    def release(self) -> Deferred[None]:
        self.valid_until = 0.0
        return self.bus.execute("EVAL", _RELEASE, "1", self.key, self.holder)
