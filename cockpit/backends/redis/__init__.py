"""Every piece of shared state on one Redis: several cockpit processes, on several machines, see it alike."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime

from cockpit.backends import Backend
from cockpit.backends.redis.bus import RedisBus
from cockpit.config import RedisSection

__all__ = ["RedisBackend", "RedisBus"]


class RedisBackend(Backend):
    kind = "redis"
    bus: RedisBus

    def __init__(self, settings: RedisSection, reactor: Any, bus: Optional[RedisBus] = None):
        super().__init__(bus if bus is not None else RedisBus(settings, reactor=reactor))

    def catalog_store(self, repos_dir: Path, data_dir: Path, clock: IReactorTime) -> Any:
        from cockpit.backends.redis.catalog import RedisCatalogStore

        return RedisCatalogStore(self.bus, Path(data_dir) / "actions", clock, import_from=repos_dir)

    def group_store(self, clock: IReactorTime, samples: int = 20) -> Any:
        from cockpit.backends.redis.groups import RedisGroupStore

        return RedisGroupStore(self.bus, clock, samples)

    def outbox(self, history: int = 500) -> Any:
        from cockpit.backends.redis.outbox import RedisOutbox

        return RedisOutbox(self.bus, history=history)

    def run_history(self, clock: IReactorTime, keep_days: float = 30.0, keep_runs: int = 100000) -> Any:
        from cockpit.backends.redis.runs import RedisRunHistory

        return RedisRunHistory(self.bus, clock, keep_days, keep_runs)

    def bot_state(self, bot_id: str) -> Any:
        from cockpit.backends.redis.telegram import RedisBotState

        return RedisBotState(self.bus, bot_id)

    def lease(self, bot_id: str, clock: IReactorTime, ttl: float) -> Any:
        from cockpit.backends.redis.telegram import RedisLease

        return RedisLease(self.bus, bot_id, clock, ttl=ttl)

    def heartbeats(self, clock: IReactorTime) -> Any:
        from cockpit.backends.redis.heartbeats import RedisHeartbeatStore

        return RedisHeartbeatStore(self.bus, clock)

    def silences(self, clock: IReactorTime) -> Any:
        from cockpit.backends.redis.silences import RedisSilenceStore

        return RedisSilenceStore(self.bus, clock)
