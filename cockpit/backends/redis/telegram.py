"""The Telegram bot's shared state in Redis: offset, users' repos and refusals, the polling lease and notice counts.

Keys: ``ckpt.telegram.<what>.<bot id>`` (offset, repo, refused, lease) and
``ckpt.telegram.notice.<hash>.{count,owner}``.
"""
from __future__ import annotations

import hashlib
import os
import socket
import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit.backends.redis.bus import RedisBus
from cockpit.events import Event
from cockpit.telegram import NoticeBatcher, _Notice, notice_key, notice_text
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

    def offset(self) -> Deferred:
        return self.bus.execute("GET", self.offset_key).addCallback(lambda v: int(v) if v else None)

    def save_offset(self, offset: int) -> Deferred:
        return self.bus.execute("SET", self.offset_key, str(offset))

    def current_repo(self, user_id: int) -> Deferred:
        return self.bus.execute("HGET", self.repo_key, str(user_id)).addCallback(lambda v: v or None)

    def set_current_repo(self, user_id: int, repo: Optional[str]) -> Deferred:
        if repo is None:
            return self.bus.execute("HDEL", self.repo_key, str(user_id))
        return self.bus.execute("HSET", self.repo_key, str(user_id), repo)

    def first_refusal(self, user_id: int) -> Deferred:
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
    def acquire(self):
        """Fires with whether this process holds the lease now."""
        asked_at = self.clock.seconds()
        reply = yield self.bus.execute("SET", self.key, self.holder, "NX", "PX", str(int(self.ttl * 1000)))
        if reply is not None and str(reply).upper() == "OK":
            return self._granted(asked_at)
        return (yield self.renew())

    @inlineCallbacks
    def renew(self):
        """Fires with whether this process still holds the lease (and extends it if so)."""
        asked_at = self.clock.seconds()
        reply = yield self.bus.execute("EVAL", _RENEW, "1", self.key, self.holder, str(int(self.ttl * 1000)))
        if int(reply) == 1:
            return self._granted(asked_at)
        self.valid_until = 0.0
        return False

    def release(self) -> Deferred:
        self.valid_until = 0.0
        return self.bus.execute("EVAL", _RELEASE, "1", self.key, self.holder)


class RedisNoticeBatcher(NoticeBatcher):
    """The same notices, counted in Redis, so that several cockpits send one notice between them.

    Every process adds its repeats to a counter in Redis; the process that saw a notice first
    (a SET NX key it renews while the repeats go on) is the one that sends it and its sums.
    If that process dies, its key expires and the next repeat is news again.
    """

    prefix = "ckpt.telegram.notice."

    def __init__(self, send: Callable[[str], Deferred], clock: IReactorTime, bus: RedisBus,
                 gather: float = 2.0, window: float = 60.0):
        super().__init__(send, clock, gather=gather, window=window)
        self.bus = bus
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.flushing: set[Deferred] = set()

    def _keys(self, key: tuple[str, ...]) -> tuple[str, str]:
        base = self.prefix + hashlib.sha256("\x00".join(key).encode()).hexdigest()[:24]
        return base + ".count", base + ".owner"

    def _ttl(self) -> str:
        return str(int((self.gather + self.window) * 1000) + 5000)

    def add(self, event: Event) -> Optional[Deferred]:  # type: ignore[override]
        key = notice_key(event)
        if key is None:
            return None
        count, owner = self._keys(key)
        d = self.bus.transaction(("INCR", count), ("PEXPIRE", count, self._ttl()),
                                 ("SET", owner, self.holder, "NX", "PX", self._ttl()))
        d.addCallback(self._counted, key, event)
        d.addErrback(lambda f: log.warn("could not count a notice: {error}", error=f.getErrorMessage()))
        return d

    def _counted(self, replies: list, key: tuple[str, ...], event: Event) -> None:
        became_owner = replies[2] is not None and str(replies[2]).upper() == "OK"
        if became_owner and key not in self.notices:
            notice = self.notices[key] = _Notice(notice_text(event), 0)
            notice.timer = self.clock.callLater(self.gather, self._flush, key, True)

    def _flush(self, key: tuple[str, ...], first: bool) -> None:
        count, _ = self._keys(key)
        d = self.bus.execute("GETSET", count, "0")

        def taken(value: Any) -> None:
            notice = self.notices.get(key)
            if notice is not None:
                notice.count = int(value or 0)
                self._say(key, first)

        d.addCallback(taken)
        d.addErrback(lambda f: log.warn("could not read a notice's count: {error}", error=f.getErrorMessage()))
        self.flushing.add(d)
        d.addBoth(lambda _: self.flushing.discard(d))

    def _keep(self, key: tuple[str, ...]) -> None:
        count, owner = self._keys(key)
        self.bus.transaction(("PEXPIRE", owner, self._ttl()), ("PEXPIRE", count, self._ttl())).addErrback(
            lambda f: None)  # if it lapses, the next repeat is news again: no harm

    def _forget(self, key: tuple[str, ...]) -> None:
        _, owner = self._keys(key)
        self.bus.execute("DEL", owner).addErrback(lambda f: None)
