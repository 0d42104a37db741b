"""The embedded backend: the same interfaces inside one process, kept on its ``data_dir``.

Events stay in this process's memory (the bus says so at start); what must survive a
restart (outgoing mail, the bot's offset) is written under ``data_dir``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime

from cockpit.backends import Backend
from cockpit.backends.embedded.bus import MemoryBus

__all__ = ["EmbeddedBackend", "MemoryBus"]


class EmbeddedBackend(Backend):
    kind = "embedded"
    bus: MemoryBus

    def __init__(self, data_dir: Optional[Path], reactor: Any, bus: Optional[MemoryBus] = None):
        super().__init__(bus if bus is not None else MemoryBus(clock=reactor))
        # None: nothing on disk (tests that need no restart)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.reactor = reactor

    def catalog_store(self, repos_dir: Path, data_dir: Path, clock: IReactorTime) -> Any:
        from cockpit.backends.embedded.catalog import DiskCatalogStore

        return DiskCatalogStore(repos_dir, clock)

    def group_store(self, clock: IReactorTime, samples: int = 20) -> Any:
        from cockpit.backends.embedded.groups import MemoryGroupStore

        return MemoryGroupStore(clock, samples)

    def outbox(self, history: int = 500) -> Any:
        from cockpit.backends.embedded.outbox import SpoolOutbox

        return SpoolOutbox(self.data_dir / "mail" if self.data_dir is not None else None, self.reactor,
                           history=history)

    def run_history(self, clock: IReactorTime, keep_days: float = 30.0, keep_runs: int = 100000) -> Any:
        from cockpit.backends.embedded.runs import SqliteRunHistory

        if self.data_dir is None:
            raise ValueError("the run history needs a data_dir")
        return SqliteRunHistory(self.data_dir / "runs.sqlite", clock, keep_days, keep_runs)

    def bot_state(self, bot_id: str) -> Any:
        from cockpit.backends.embedded.telegram import FileBotState

        if self.data_dir is None:
            raise ValueError("the bot's state needs a data_dir")
        return FileBotState(self.data_dir / "telegram", bot_id)

    def lease(self, bot_id: str, clock: IReactorTime, ttl: float) -> None:
        return None  # one process: nobody to share the token with

    def heartbeats(self, clock: IReactorTime) -> Any:
        from cockpit.backends.embedded.heartbeats import MemoryHeartbeatStore

        return MemoryHeartbeatStore(clock)

    def silences(self, clock: IReactorTime) -> Any:
        from cockpit.backends.embedded.silences import MemorySilenceStore

        return MemorySilenceStore(clock)
