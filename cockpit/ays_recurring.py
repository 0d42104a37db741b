"""Recurring actions (``recurring.<action> = 5m`` in a template's ``service.hrd``).

Each fires at its period boundaries, the first one after it was seen, and once per period
across every cockpit process on one bus: the process that stores the period's mark
(``bus.remember``, a ``SET NX`` in Redis) runs it. A period whose previous run is still
going is skipped, and the log says so.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.ays_catalog import Catalog, Subscription
from cockpit.bus import Bus
from cockpit.repos import NotFound

log = Logger()

RECURRING_KEY = "ckpt.ays.recurring:{repo}:{service}:{action}:{slot}"


def _fire_failed(failure: Failure, sub: Subscription) -> None:
    log.warn("recurring {action} of {service}: {error}", action=sub.action, service=sub.service,
             error=failure.getErrorMessage())


class RecurringActions(Service):
    """The timer of the recurring actions in ``catalog``.

    ``start(sub)`` starts a run of one (a Deferred that fires once it is recorded; NotFound when
    the service went away); ``busy(sub)`` says whether a recurring run of it is still going.
    """

    def __init__(self, catalog: Catalog, bus: Bus, clock: IReactorTime, start: Callable[[Subscription], Deferred[Any]],
                 busy: Callable[[Subscription], bool], tick: float = 1.0):
        self.catalog = catalog
        self.bus = bus
        self.clock = clock
        self.start = start
        self.busy = busy
        self.tick = tick
        self._last_slot: dict[tuple[str, str, str], int] = {}
        self._timer: Optional[TimerService] = None

    def startService(self) -> None:
        # Service and TimerService are Twisted's own, unannotated
        super().startService()  # type: ignore[no-untyped-call]
        self._timer = TimerService(self.tick, self._tick)  # type: ignore[no-untyped-call]
        self._timer.clock = self.clock
        self._timer.startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None:
            return self._timer.stopService()  # type: ignore[no-untyped-call]
        return None

    def _tick(self) -> None:
        # returns nothing: a Deferred would make the timer wait for Redis before its next tick
        try:
            self.fire_due()
        except Exception:
            log.failure("recurring actions failed")

    def fire_due(self) -> None:
        """Claim and start each recurring action whose new period began since the last tick."""
        now = self.clock.seconds()
        wanted = set()
        for sub, period in self.catalog.recurring():
            ident = (sub.repo, sub.service, sub.action)
            wanted.add(ident)
            slot = int(now // period)
            last = self._last_slot.get(ident)
            self._last_slot[ident] = slot
            if last is None or slot <= last:
                continue  # fires at period boundaries, the first one after it was seen
            if self.busy(sub):
                log.warn("recurring {action} of {service} is still running; this period is skipped",
                         action=sub.action, service=sub.service)
                continue
            self._claim(sub, slot, period).addCallback(self._fire_claimed, sub).addErrback(_fire_failed, sub)
        for ident in set(self._last_slot) - wanted:
            del self._last_slot[ident]

    def _claim(self, sub: Subscription, slot: int, period: float) -> Deferred[bool]:
        """Fires True for the one process, of all that share the bus, that runs this period."""
        key = RECURRING_KEY.format(repo=sub.repo, service=sub.service, action=sub.action, slot=slot)
        return self.bus.remember(key, str(os.getpid()), period * 2)

    def _fire_claimed(self, claimed: bool, sub: Subscription) -> None:
        if not claimed:
            return
        try:
            d = self.start(sub)
        except NotFound:
            return
        d.addErrback(lambda f: log.warn("recurring {action} of {service} was not completed: {error}",
                                        action=sub.action, service=sub.service, error=f.getErrorMessage()))
