"""The one boundary of shared state: what cockpit processes share, behind interfaces with two implementations.

A :class:`Backend` hands out every piece of state that several processes must see alike:
the bus, the AYS catalog, the event groups (and their due notices), the outgoing mail, the
Telegram bot's state and lease (and, through the bus, marks such as the recurring actions' claims). There are
two: :class:`cockpit.backends.redis.RedisBackend`, shared by every process on one
Redis, and :class:`cockpit.backends.embedded.EmbeddedBackend`, inside one process, on
its ``data_dir``. :func:`make_backend` picks one, once, where the service tree is built;
everything else talks to the interfaces. No module outside this package sends a Redis
command.

The interfaces live with the domain they serve: :class:`cockpit.bus.Bus`,
:class:`cockpit.ays_catalog.CatalogStore`, :class:`cockpit.groups.GroupStore`, :class:`cockpit.outbox.Outbox`,
:class:`cockpit.telegram_poll.BotState` and :class:`cockpit.telegram_poll.Lease`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import IReactorTime

from cockpit.bus import Bus
from cockpit.groups import GroupStore
from cockpit.outbox import Outbox
from cockpit.runs import RunHistory
from cockpit.telegram_poll import BotState, Lease

if TYPE_CHECKING:
    from cockpit.ays_catalog import CatalogStore
    from cockpit.config import Config
    from cockpit.heartbeats import HeartbeatStore
    from cockpit.silences import SilenceStore

__all__ = ["Backend", "Bus", "GroupStore", "Outbox", "BotState", "Lease", "make_backend"]


class Backend:
    """Where one cockpit keeps what it shares; see the module docstring."""

    kind = "abstract"

    def __init__(self, bus: Bus):
        self.bus = bus

    def catalog_store(self, repos_dir: Path, data_dir: Path, clock: IReactorTime) -> "CatalogStore":
        """Where the AYS catalog lives: ``repos_dir`` on disk, or Redis (which imports ``repos_dir`` the
        first time it finds repositories there); ``data_dir`` holds what this process keeps for itself."""
        raise NotImplementedError

    def group_store(self, clock: IReactorTime, samples: int = 20) -> GroupStore:
        """The eco and alarm groups, keeping ``[groups] samples`` occurrences each."""
        raise NotImplementedError

    def outbox(self, history: int = 500) -> Outbox:
        raise NotImplementedError

    def run_history(self, clock: IReactorTime, keep_days: float = 30.0, keep_runs: int = 100000) -> RunHistory:
        """The run history, pruned by ``[ays] keep_days`` and ``keep_runs`` on ``clock``."""
        raise NotImplementedError

    def bot_state(self, bot_id: str) -> BotState:
        raise NotImplementedError

    def lease(self, bot_id: str, clock: IReactorTime, ttl: float) -> Optional[Lease]:
        """The polling lease of a bot token; None where one process is all there is."""
        raise NotImplementedError

    def heartbeats(self, clock: IReactorTime) -> "HeartbeatStore":
        """The heartbeats and their deadlines, checked once across every process that shares them."""
        raise NotImplementedError

    def silences(self, clock: IReactorTime) -> "SilenceStore":
        """The silences (maintenance windows, docs/design.md §11)."""
        raise NotImplementedError


def make_backend(cfg: "Config", reactor: Any) -> Backend:
    """Redis when ``[redis]`` is set, else the embedded backend on ``data_dir``: the one place that chooses."""
    if cfg.redis is not None:
        from cockpit.backends.redis import RedisBackend

        return RedisBackend(cfg.redis, reactor)
    from cockpit.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(cfg.data_dir, reactor)
