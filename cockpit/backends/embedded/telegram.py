"""The Telegram bot's state in ``<data_dir>/telegram/<bot id>.json`` (the embedded backend)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, DeferredLock

from cockpit.files import write_atomically
from cockpit.telegram_poll import BotState


class FileBotState(BotState):
    """State in ``<data_dir>/telegram/<bot>.json``, replaced atomically by a thread on every change."""

    def __init__(self, directory: Path, bot_id: str):
        self.path = Path(directory) / f"{bot_id}.json"
        self.data: dict[str, Any] = {"offset": None, "repos": {}, "refused": []}
        self._lock = DeferredLock()
        self._loaded: Optional[Deferred[None]] = None

    def load(self) -> Deferred[None]:
        if self._loaded is None:
            self._loaded = threads.deferToThread(self._read).addCallback(self._got)
        return self._loaded

    def _read(self) -> Any:  # the file's JSON, or None when there is none yet
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def _got(self, data: Any) -> None:
        if isinstance(data, dict):
            self.data.update(data)

    def _save(self) -> Deferred[None]:
        # serialised: a slow older write must not land after a newer one
        return self._lock.run(lambda: threads.deferToThread(
            write_atomically, self.path, json.dumps(self.data).encode("utf-8")))

    def offset(self) -> Deferred[Optional[int]]:
        return self.load().addCallback(lambda _: self.data.get("offset"))

    def save_offset(self, offset: int) -> Deferred[None]:
        self.data["offset"] = offset
        return self._save()

    def current_repo(self, user_id: int) -> Deferred[Optional[str]]:
        return self.load().addCallback(lambda _: self.data["repos"].get(str(user_id)))

    def set_current_repo(self, user_id: int, repo: Optional[str]) -> Deferred[None]:
        if repo is None:
            self.data["repos"].pop(str(user_id), None)
        else:
            self.data["repos"][str(user_id)] = repo
        return self._save()

    def first_refusal(self, user_id: int) -> Deferred[bool]:
        if user_id in self.data["refused"]:
            return defer.succeed(False)
        self.data["refused"].append(user_id)
        return self._save().addCallback(lambda _: True)
