"""Logging for journald and log shippers.

``twistd --logger cockpit.logs.json_observer`` writes JSON lines, ``cockpit.logs.text_observer``
twistd's text lines; both leave out the reconnection attempts Twisted logs one by one, since
the bus says once that Redis went away and once that it is back.
"""
from __future__ import annotations

import json
import sys
from typing import IO, Any, cast

from twisted.logger import (FileLogObserver, FilteringLogObserver, ILogFilterPredicate, ILogObserver, PredicateResult,
                            formatEvent, textFileLogObserver)

_SKIP = {"log_format", "log_logger", "log_source", "log_time", "log_level", "log_namespace",
         "log_failure", "log_io", "log_system", "format", "message", "isError", "system", "time",
         "log_trace", "log_text", "log_flattened", "why", "failure"}


# ClientService's "Scheduling retry N to connect ... in D seconds.", one a reconnection attempt
_RETRY_NAMESPACE = "twisted.application._client_service.ClientService"
_RETRY_FORMAT = "Scheduling retry "
_DEAD_CONNECTION = ("Discarding dead connection.",)
# constantly, which defines PredicateResult's values, is untyped: named here with their type
_DROP: PredicateResult = PredicateResult.no
_UNDECIDED: PredicateResult = PredicateResult.maybe


def quiet(event: dict[str, Any]) -> PredicateResult:
    """Drops the reconnection attempts; keeps everything else."""
    if event.get("log_namespace") == _RETRY_NAMESPACE and \
            str(event.get("log_format", "")).startswith(_RETRY_FORMAT):
        return _DROP
    if event.get("message") == _DEAD_CONNECTION:  # txredisapi's, after each reconnect
        return _DROP
    return _UNDECIDED


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


# Twisted takes a plain function as a predicate, though its annotation names the interface
_QUIET = cast(ILogFilterPredicate, quiet)


def json_observer(out: IO[str] = sys.stdout) -> ILogObserver:
    """One JSON object a line: time, level, namespace, message and the event's own fields."""
    return FilteringLogObserver(FileLogObserver(out, _line), [_QUIET])


def text_observer(out: IO[str] = sys.stdout) -> ILogObserver:
    """twistd's text lines, without the reconnection attempts."""
    return FilteringLogObserver(textFileLogObserver(out), [_QUIET])
