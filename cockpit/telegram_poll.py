"""The Telegram long-poller, the bot's persistent state and the polling lease.

The poller asks ``getUpdates`` for updates from its offset on, hands each update to a
handler (which publishes its event), and only then stores ``update_id + 1`` as the new
offset: an update is published at least once, and after a clean stop or a restart none is
handled twice. With Redis the state lives under ``ckpt.telegram.*`` and a lease
(``SET NX PX`` renewed while held) lets exactly one of several cockpit processes poll; with
the embedded backend it lives in one JSON file in the data directory (:mod:`cockpit.backends`).
"""
from __future__ import annotations

from typing import Any, Callable, Generator, Optional

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit.backoff import doubling
from cockpit.bus import BusUnavailable
from cockpit.telegram_api import ApiUnreachable, BadToken, BotApi, Conflict, RetryAfter, TelegramError

log = Logger()

ALLOWED_UPDATES = ("message", "callback_query")


# ---------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------

class BotState:
    """What the bot remembers across restarts: the offset, each user's repo, who was refused."""

    def load(self) -> Deferred[None]:
        """Fires when the state can be used."""
        return defer.succeed(None)

    def offset(self) -> Deferred[Optional[int]]:
        """Fires with the next update id to ask for, or None at the very start."""
        raise NotImplementedError

    def save_offset(self, offset: int) -> Deferred[None]:
        raise NotImplementedError

    def current_repo(self, user_id: int) -> Deferred[Optional[str]]:
        """Fires with the repo ``user_id`` works in, or None."""
        raise NotImplementedError

    def set_current_repo(self, user_id: int, repo: Optional[str]) -> Deferred[None]:
        raise NotImplementedError

    def first_refusal(self, user_id: int) -> Deferred[bool]:
        """Fires with True the first time it is asked about ``user_id``, False ever after."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# lease
# ---------------------------------------------------------------------------

class Lease:
    """A lease on polling one bot token, so that one process polls it at a time."""

    ttl: float

    @property
    def held(self) -> bool:
        raise NotImplementedError

    valid_until: float  # when this process's hold ends unless renewed; 0 when it does not hold the lease

    def acquire(self) -> Deferred[bool]:
        """Fires with whether this process holds the lease now."""
        raise NotImplementedError

    def renew(self) -> Deferred[bool]:
        """Fires with whether this process still holds the lease (and extends it if so)."""
        raise NotImplementedError

    def release(self) -> Deferred[None]:
        raise NotImplementedError


# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# the poller
# ---------------------------------------------------------------------------

UpdateHandler = Callable[[dict[str, Any]], Any]


class UpdatePoller(Service):
    """Long-polls getUpdates and hands each update to ``handler`` (which may return a Deferred).

    The offset is stored after the handler succeeded. A handler failing with BusUnavailable is
    retried (the update is not skipped); any other failure is logged and the update skipped.
    """

    def __init__(self, api: BotApi, state: BotState, handler: UpdateHandler, clock: IReactorTime,
                 lease: Optional[Lease] = None, poll_timeout: int = 30,
                 backoff_start: float = 1.0, backoff_cap: float = 30.0):
        self.api = api
        self.state = state
        self.handler = handler
        self.clock = clock
        self.lease = lease
        self.poll_timeout = poll_timeout
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.offset: Optional[int] = None
        self.attempts = 0  # getUpdates calls made
        self.handled = 0  # updates handled and stored
        self.status = "stopped"
        self._failures = 0
        self._loop: Optional[Deferred[None]] = None
        self._poll: Optional[Deferred[list[dict[str, Any]]]] = None
        self._sleep: Optional[Deferred[None]] = None
        self._renewal: Optional[task.LoopingCall] = None
        self._wait_watchers: list[Deferred[tuple[str, float]]] = []
        self._handled_watchers: list[tuple[int, Deferred[int]]] = []

    # -- lifetime ---------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.status = "starting"
        self._loop = self._run()
        self._loop.addErrback(lambda f: log.failure("the Telegram poller stopped", f))
        if self.lease is not None:
            self._renewal = task.LoopingCall(self._renew)
            self._renewal.clock = self.clock
            self._renewal.start(self.lease.ttl / 3, now=False)

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._interrupt()
        if self._loop is not None:
            # an update being handled finishes and its offset is stored; nothing new starts
            yield self._loop
        if self.lease is not None and self.lease.valid_until:
            try:
                yield self.lease.release()
            except Exception as exc:
                log.warn("could not release the Telegram polling lease ({error}); it expires by itself",
                         error=exc)
        self.status = "stopped"

    def _interrupt(self) -> None:
        for d in (self._poll, self._sleep):
            if d is not None and not d.called:
                d.cancel()

    # -- observing (tests, health) ------------------------------------------------------
    def next_wait(self) -> Deferred[tuple[str, float]]:
        """Fires with ``(reason, seconds)`` when the poller next waits before polling again."""
        d: Deferred[tuple[str, float]] = Deferred()
        self._wait_watchers.append(d)
        return d

    def when_handled(self, count: int) -> Deferred[int]:
        """Fires once ``count`` updates have been handled in all."""
        if self.handled >= count:
            return defer.succeed(self.handled)
        d: Deferred[int] = Deferred()
        self._handled_watchers.append((count, d))
        return d

    # -- the loop ------------------------------------------------------------------------
    def _wait(self, seconds: float, reason: str) -> Deferred[None]:
        if not self.running:
            return defer.succeed(None)  # stopping: whatever went wrong, there is no next try
        self.status = f"waiting {seconds:g} s ({reason})"
        self._sleep = task.deferLater(self.clock, seconds, lambda: None)
        self._sleep.addErrback(lambda f: f.trap(CancelledError))
        # told after the timer is set: a watcher may advance the clock at once
        watchers, self._wait_watchers = self._wait_watchers, []
        for d in watchers:
            d.callback((reason, seconds))
        return self._sleep

    def _backoff(self) -> float:
        self._failures += 1
        return doubling(self.backoff_start, self._failures, self.backoff_cap)

    @inlineCallbacks
    def _read_state(self, load: bool) -> Generator[Deferred[Any], Any, bool]:
        """Fires True once the offset has been read (and the state loaded, if asked); False when stopping."""
        while self.running:
            try:
                if load:
                    yield self.state.load()
                    load = False
                self.offset = yield self.state.offset()
                self._failures = 0
                return True
            except Exception as exc:
                log.warn("cannot read the Telegram bot's state ({error}); retrying", error=exc)
                yield self._wait(self._backoff(), "state unreadable")
        return False

    @inlineCallbacks
    def _run(self) -> Generator[Deferred[Any], Any, None]:
        # with a lease, the offset is read each time it is taken: whoever held it before moved it on
        if not (yield self._read_state(load=True)):
            return  # stopped before the state could be read
        while self.running:
            if self.lease is not None and not self.lease.held:
                if not (yield self._take_lease()):
                    continue
                if not (yield self._read_state(load=False)):
                    continue
            try:
                self.attempts += 1
                self.status = "polling"
                self._poll = self.api.get_updates(self.offset, timeout=self.poll_timeout,
                                                  allowed_updates=ALLOWED_UPDATES)
                updates = yield self._poll
            except CancelledError:
                continue  # stopping, or the lease was lost: the loop's condition decides
            except RetryAfter as exc:
                log.warn("Telegram asks the bot to slow down: waiting {seconds} s", seconds=exc.retry_after)
                yield self._wait(exc.retry_after, "429 Too Many Requests")
                continue
            except Conflict as exc:
                log.error("Telegram refused getUpdates with 409 Conflict ({description}): another process "
                          "polls this bot's token (or a webhook is set). Only one may: give every cockpit "
                          "that shares the token the same [redis], and stop any other bot using it.",
                          description=exc.description)
                yield self._wait(self._backoff(), "409 Conflict")
                continue
            except BadToken:
                log.error("Telegram refused the bot token (401 Unauthorized); the bot stops polling. "
                          "Fix [bot] token and restart the cockpit.")
                self.status = "stopped: bad token"
                return
            except TelegramError as exc:
                seconds = self._backoff()
                log.warn("getUpdates failed ({error}); retrying in {seconds} s", error=exc, seconds=seconds)
                yield self._wait(seconds, "network failure" if isinstance(exc, ApiUnreachable) else "error")
                continue
            finally:
                self._poll = None
            if self._failures:
                log.info("the Telegram API answers again")
            self._failures = 0
            for update in updates or []:
                if not self.running or (self.lease is not None and not self.lease.held):
                    break  # the rest are for whoever polls next, from the stored offset
                yield self._handle(update)

    @inlineCallbacks
    def _take_lease(self) -> Generator[Deferred[Any], Any, bool]:
        assert self.lease is not None  # the loop takes the lease only when there is one
        self.status = "standby"
        try:
            held = yield self.lease.acquire()
        except Exception as exc:
            log.warn("cannot take the Telegram polling lease ({error}); retrying", error=exc)
            held = False
        if held:
            log.info("this process now polls Telegram for bot {bot}", bot=self.api.bot_id)
            return True
        yield self._wait(self.lease.ttl / 3, "another process polls")
        return False

    def _renew(self) -> Deferred[None]:
        lease = self.lease
        assert lease is not None  # renewal runs only with a lease
        if not lease.valid_until:
            return defer.succeed(None)  # not held: the loop takes it when it can
        d = lease.renew()

        def renewed(held: bool) -> None:
            if not held:
                log.warn("the Telegram polling lease went to another process; this one stops polling")
                if self._poll is not None:
                    self._poll.cancel()

        def failed(failure: Any) -> None:
            log.warn("cannot renew the Telegram polling lease: {error}", error=failure.getErrorMessage())
            if not lease.held and self._poll is not None:
                self._poll.cancel()

        return d.addCallbacks(renewed, failed)

    @inlineCallbacks
    def _handle(self, update: dict[str, Any]) -> Generator[Deferred[Any], Any, None]:
        update_id = update.get("update_id")
        if not isinstance(update_id, int):
            log.warn("ignored an update without an update_id")
            return
        failures = 0
        while True:
            try:
                yield defer.maybeDeferred(self.handler, update)
                break
            except BusUnavailable as exc:
                # the event is not stored yet: keep the update, wait for the bus
                failures += 1
                if not self.running:
                    return
                seconds = doubling(self.backoff_start, failures, self.backoff_cap)
                log.warn("cannot publish Telegram update {id} ({error}); retrying in {seconds} s",
                         id=update_id, error=exc, seconds=seconds)
                yield self._wait(seconds, "bus unavailable")
            except Exception:
                log.failure("handling Telegram update {id} failed; it is skipped", id=update_id)
                break
        self.offset = update_id + 1
        failures = 0
        while True:
            try:
                yield self.state.save_offset(self.offset)
                break
            except Exception as exc:
                failures += 1
                if not self.running:
                    log.warn("stopped before the Telegram offset {offset} was stored; update {id} may be "
                             "handled again", offset=self.offset, id=update_id)
                    return
                seconds = doubling(self.backoff_start, failures, self.backoff_cap)
                log.warn("cannot store the Telegram offset ({error}); retrying in {seconds} s",
                         error=exc, seconds=seconds)
                yield self._wait(seconds, "offset not stored")
        self.handled += 1
        for count, d in list(self._handled_watchers):
            if self.handled >= count:
                self._handled_watchers.remove((count, d))
                d.callback(self.handled)

