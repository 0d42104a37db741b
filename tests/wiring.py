"""Tests build their own bus; this wraps it in the backend the cockpit would have made around it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor

from cockpit.backends import Backend
from cockpit.backends.embedded import EmbeddedBackend, MemoryBus
from cockpit.backends.redis import RedisBackend, RedisBus


def disk_catalog(repos_dir: Path, clock: Any = None) -> Any:
    """The embedded catalog on ``repos_dir`` (docs/design.md §7's layout), not started."""
    from cockpit.ays_catalog import Catalog
    from cockpit.backends.embedded.catalog import DiskCatalogStore

    return Catalog(DiskCatalogStore(Path(repos_dir), clock or reactor), clock or reactor)


def backend_for(bus: Any, data_dir: Optional[Path] = None, clock: Any = None) -> Backend:
    if isinstance(bus, RedisBus):
        return RedisBackend(bus.settings, clock or reactor, bus=bus)
    assert isinstance(bus, MemoryBus)
    return EmbeddedBackend(data_dir, clock or reactor, bus=bus)


def started(test: Any, bus: Any) -> Any:
    """``bus`` started, and stopped at the end of ``test``: a Deferred firing with it once it can be
    used (a Redis bus once it is connected)."""
    from twisted.internet import defer

    bus.startService()
    test.addCleanup(bus.stopService)
    ready = bus.when_connected() if bus.remote else defer.succeed(None)
    return ready.addCallback(lambda _: bus)
