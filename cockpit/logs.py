"""JSON-lines logging for journald and log shippers: ``twistd --logger cockpit.logs.json_observer``."""
from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

_SKIP = {"log_format", "log_logger", "log_source", "log_time", "log_level", "log_namespace",
         "log_failure", "log_io", "log_system", "format", "message", "isError", "system", "time",
         "log_trace", "log_text", "log_flattened", "why", "failure"}


def _line(event: dict[str, Any]) -> str:
    record: dict[str, Any] = {
        "time": round(event.get("log_time", 0), 6),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key not in _SKIP and not key.startswith("_"):
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = repr(value)
            record[key] = value
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(out: IO[str] = sys.stdout) -> ILogObserver:
    """One JSON object a line: time, level, namespace, message and the event's own fields."""
    return FileLogObserver(out, _line)
