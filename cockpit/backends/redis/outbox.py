"""Outgoing mail in Redis: the stream ``ckpt.mail.out``, the hash ``ckpt.mail.records``, the sorted set
``ckpt.mail.order`` (see :mod:`cockpit.outbox`)."""
from __future__ import annotations

import json
from typing import Any, Optional, Union

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.backends.redis.bus import RedisBus
from cockpit.bus import DEAD_LETTER_STREAM, BusUnavailable, Delivery
from cockpit.outbox import (MAIL_GROUP, MAIL_ORDER, MAIL_RECORDS, MAIL_STREAM, PARKED_IDLE_MS, TERMINAL, MailQueueFull,
                            Outbox, QueuedMail, Suspended, Take)

log = Logger()

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

    def add(self, mail: QueuedMail) -> Deferred[int]:
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

    def update(self, record: dict[str, Any]) -> Deferred[int]:
        return self.bus.execute("HSET", MAIL_RECORDS, record["id"], json.dumps(record))

    def finish(self, mail: QueuedMail, dead_error: Optional[str] = None) -> Deferred[list[Any]]:
        commands: list[tuple[str, ...]] = [("HSET", MAIL_RECORDS, mail.id, json.dumps(mail.record))]
        if dead_error is not None:
            commands.append(("XADD", DEAD_LETTER_STREAM, "MAXLEN", "~", str(self.bus.stream_maxlen), "*",
                             "stream", MAIL_STREAM, "id", mail.entry or "", "group", MAIL_GROUP,
                             "deliveries", str(mail.deliveries), "error", dead_error, "event", mail.to_json()))
        if mail.entry is not None:
            commands += [("XACK", MAIL_STREAM, MAIL_GROUP, mail.entry), ("XDEL", MAIL_STREAM, mail.entry)]
        return self.bus.transaction(*commands)

    def suspend(self, mail: QueuedMail) -> Deferred[None]:
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

    def records(self, limit: int) -> Deferred[list[dict[str, Any]]]:
        if limit <= 0:
            return defer.succeed([])

        def fetch(ids: list[str]) -> Union[list[dict[str, Any]], Deferred[list[dict[str, Any]]]]:
            if not ids:
                return []
            return self.bus.execute("HMGET", MAIL_RECORDS, *ids).addCallback(
                lambda found: [json.loads(text) for text in found if text])

        return self.bus.execute("ZREVRANGE", MAIL_ORDER, "0", str(limit - 1)).addCallback(fetch)

    def record(self, mail_id: str) -> Deferred[Optional[dict[str, Any]]]:
        return self.bus.execute("HGET", MAIL_RECORDS, mail_id).addCallback(
            lambda text: json.loads(text) if text else None)

    def start(self, take: Take) -> None:
        self._take = take
        self.consumer = self.bus.consumer(
            MAIL_GROUP, self._handle, types=("mail.out",), concurrency=self.concurrency,
            drain_timeout=self.drain_timeout, decode=QueuedMail.from_json)
        self.consumer_name = self.consumer.consumer_name
        self.consumer.startService()
        # mails put back at a stop, or left by a crash, are taken at once, not a claim interval later
        self.consumer.reclaim().addErrback(
            lambda f: log.warn("mail outbox: first reclaim failed: {error}", error=f.getErrorMessage()))

    def stop(self) -> Deferred[None]:
        consumer, self.consumer = self.consumer, None
        return defer.maybeDeferred(consumer.stopService) if consumer is not None else defer.succeed(None)

    def _handle(self, mail: QueuedMail, delivery: Delivery) -> Deferred[Any]:
        mail.entry, mail.deliveries = delivery.id, delivery.deliveries

        def take(stored: Optional[dict[str, Any]]) -> Deferred[Any]:
            if stored is not None and stored.get("id") == mail.id:
                mail.record = stored  # newer than the entry's copy: attempts made since it was written
            if mail.record.get("state") in TERMINAL:
                # finished before a crash took the acknowledgement with it
                mail.raw = None
                return self.finish(mail)
            assert self._take is not None
            return self._take(mail)

        return self.record(mail.id).addCallback(take)
