"""Cockpit: an event hub for operations teams.

An extension (docs/design.md §13) finds what it needs here: ``cockpit.BusUnavailable`` (the bus
cannot take an event now: answer 503), ``cockpit.EventError`` (a bad event; its message names the
field) and ``cockpit.Context`` (what a service extension is given).
"""
from typing import Any

__version__ = "0.1.0"  # the one place it is set: setup.py reads it, twistd cockpit --version and /api/health show it

__all__ = ["BusUnavailable", "Context", "EventError", "__version__"]


def __getattr__(name: str) -> Any:
    # imported when asked for: `import cockpit` stays cheap, and setup.py can read the version
    if name == "BusUnavailable":
        from cockpit.bus import BusUnavailable

        return BusUnavailable
    if name == "EventError":
        from cockpit.events import EventError

        return EventError
    if name == "Context":
        from cockpit.extensions import Context

        return Context
    raise AttributeError(f"module 'cockpit' has no attribute {name!r}")
