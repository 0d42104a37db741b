"""Health reports for the parts whose own reports miss a way they fail: the store, the run history, the bot.

Each is a function of the part, called on every ``GET /api/health``: a few stats at most, no I/O
that could wait.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

STUCK_AFTER = 3  # failed getUpdates in a row: the bot is stuck in backoff, not passing a hiccup


def store_health(store: Any) -> dict[str, Any]:
    """ok while the store's directory (or, before its first file, the nearest directory above it) is writable."""
    root = Path(store.root)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return {"ok": False, "root": str(root), "error": f"{existing} is not a directory"}
    if not os.access(existing, os.W_OK | os.X_OK):
        return {"ok": False, "root": str(root), "error": f"{existing} cannot be written"}
    return {"ok": True, "root": str(root)}


def run_history_health(history: Any) -> dict[str, Any]:
    """ok while the run history runs and, where it opens a database, opened it."""
    error = getattr(history, "_open_error", None)  # SqliteRunHistory's: set when its database cannot be opened
    if error is not None:
        return {"ok": False, "running": history.running, "error": f"cannot be opened: {error.getErrorMessage()}"}
    return {"ok": bool(history.running), "running": bool(history.running)}


def telegram_health(bot: Any) -> dict[str, Any]:
    """The bot's own report, not ok once getUpdates has failed ``STUCK_AFTER`` times in a row."""
    report: dict[str, Any] = bot.health()
    failures = getattr(bot.poller, "_failures", 0)  # reset by the poller on each getUpdates that succeeds
    report["failures_in_a_row"] = failures
    if failures >= STUCK_AFTER and bot.running:
        report["ok"] = False
    return report
