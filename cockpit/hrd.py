"""HRD, Jumpscale's "human readable data", and the two files of a service template written in it.

``parse`` reads ``key = value`` lines. A value continues on indented lines as a
comma-separated list, trailing commas allowed::

    events.email =
        notify,
        escalate,

``service_spec`` turns a ``service.hrd`` into subscriptions (``events.<type>``) and
periodic actions (``recurring.<action> = 5m``); ``schema`` turns a ``schema.hrd`` into
typed arguments (``port = type:int default:22 required``). Every error is an
:class:`HrdError` whose message names the line or key and what was expected.
"""
from __future__ import annotations

import keyword
import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from cockpit.events import EVENT_TYPES

Value = Union[str, list[str]]

MIN_PERIOD = 5.0  # seconds; a shorter recurring period would mostly measure the scheduler
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
ARG_TYPES = ("str", "int", "float", "bool", "list")


class HrdError(ValueError):
    """Text that is not valid HRD (or not a valid template file); ``str()`` says where and why."""


def _split_top(text: str, line: int) -> list[str]:
    """Split on commas outside quotes; also cut a ``#`` comment outside quotes."""
    parts, current, quote = [], [], ""
    for char in text:
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char == ",":
            parts.append("".join(current))
            current = []
        elif char == "#":
            break
        else:
            current.append(char)
    if quote:
        raise HrdError(f"line {line}: a {quote} quote is opened and never closed")
    parts.append("".join(current))
    return parts


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse(text: str) -> dict[str, Value]:
    """``key -> value`` in file order; a value is a list when it has commas or continuation lines."""
    entries: dict[str, list[str]] = {}
    continued: set[str] = set()
    first_line: dict[str, int] = {}
    current: Optional[str] = None
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0] in " \t":
            if current is None:
                raise HrdError(f"line {number}: an indented line continues a value, "
                               "but no 'key =' line comes before it")
            entries[current].extend(_split_top(stripped, number))
            continued.add(current)
            continue
        key, equals, value = raw.partition("=")
        key = key.strip()
        if not equals:
            raise HrdError(f"line {number}: expected 'key = value', got {stripped[:60]!r}")
        if not _KEY.match(key):
            raise HrdError(f"line {number}: {key!r} is not a key (letters, digits, '_', '.', '-')")
        if key in entries:
            raise HrdError(f"line {number}: {key} is given twice (first on line {first_line[key]})")
        first_line[key] = number
        entries[key] = _split_top(value.strip(), number)
        current = key
    result: dict[str, Value] = {}
    for key, parts in entries.items():
        if key in continued or len(parts) > 1:
            result[key] = [_unquote(part) for part in parts if part.strip()]
        else:
            result[key] = _unquote(parts[0])
    return result


def as_list(value: Value) -> list[str]:
    return value if isinstance(value, list) else ([value] if value else [])


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``2h``, ``1d`` or a bare number of seconds; ValueError otherwise."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError(f"expected a period such as 30s, 5m, 2h or 1d, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


# ---------------------------------------------------------------------------
# service.hrd
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ServiceSpec:
    """What a template's services react to: event type -> actions, and action -> period in seconds."""

    events: dict[str, tuple[str, ...]] = field(default_factory=dict)
    recurring: dict[str, float] = field(default_factory=dict)


def _action_name(name: str, key: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise HrdError(f"{key}: {name!r} is not an action name (a Python function name)")
    return name


def service_spec(text: str) -> ServiceSpec:
    """Read a ``service.hrd``. Keys other than ``events.*`` and ``recurring.*`` are left to the template."""
    events: dict[str, tuple[str, ...]] = {}
    recurring: dict[str, float] = {}
    for key, value in parse(text).items():
        head, _, rest = key.partition(".")
        if head == "events":
            event_type = rest.lower()
            if event_type not in EVENT_TYPES:
                raise HrdError(f"{key}: unknown event type {rest!r}: expected one of {', '.join(EVENT_TYPES)}")
            actions = tuple(dict.fromkeys(_action_name(name, key) for name in as_list(value)))
            events[event_type] = tuple(dict.fromkeys(events.get(event_type, ()) + actions))
        elif head == "recurring":
            action = _action_name(rest, key)
            if isinstance(value, list):
                raise HrdError(f"{key}: expected one period such as 5m, got a list")
            try:
                period = parse_duration(value)
            except ValueError as exc:
                raise HrdError(f"{key}: {exc}") from None
            if period < MIN_PERIOD:
                raise HrdError(f"{key}: {value} is below the minimum period of {MIN_PERIOD:g}s")
            recurring[action] = period
    return ServiceSpec(events, recurring)


# ---------------------------------------------------------------------------
# schema.hrd
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Argument:
    """One argument of a service: ``name = type:int default:22 required description:'...'``."""

    name: str
    type: str = "str"
    default: Any = None
    required: bool = False
    description: str = ""

    def coerce(self, value: Any) -> Any:
        """``value`` as this argument's type; ValueError with what was expected."""
        kind = self.type
        if value is None:
            return None
        if kind == "str":
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            raise ValueError(f"expected a string, got {value!r}")
        if kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d{1,4300}", value.strip()):
                return int(value)
            raise ValueError(f"expected an integer, got {value[:40] if isinstance(value, str) else value!r}")
        if kind == "float":
            try:
                number = float(value) if not isinstance(value, bool) else math.nan
            except (TypeError, ValueError, OverflowError):
                number = math.nan
            if not math.isfinite(number):  # JSON, where the args travel, has no NaN or infinity
                raise ValueError(f"expected a finite number, got {str(value)[:40]!r}")
            return number
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.strip().lower() in ("true", "yes", "1")
            raise ValueError(f"expected true or false, got {value!r}")
        if kind == "list":
            if isinstance(value, list):
                return value
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            raise ValueError(f"expected a list, got {value!r}")
        raise ValueError(f"unknown type {kind!r}")  # pragma: no cover - schema() refuses it


def _argument(name: str, value: Value) -> Argument:
    text = " ".join(value) if isinstance(value, list) else value
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise HrdError(f"{name}: {exc}") from None
    fields: dict[str, Any] = {"name": name}
    for token in tokens:
        word, colon, rest = token.partition(":")
        if not colon:
            if word == "required":
                fields["required"] = True
                continue
            raise HrdError(f"{name}: unknown word {word!r}: expected type:, default:, description: or required")
        if word not in ("type", "default", "description"):
            raise HrdError(f"{name}: unknown field {word!r}: expected type:, default:, description: or required")
        fields[word] = rest
    kind = fields.get("type", "str")
    if kind not in ARG_TYPES:
        raise HrdError(f"{name}: unknown type {kind!r}: expected one of {', '.join(ARG_TYPES)}")
    argument = Argument(**{k: v for k, v in fields.items() if k != "default"})
    if "default" in fields:
        try:
            default = argument.coerce(fields["default"])
        except ValueError as exc:
            raise HrdError(f"{name}: default: {exc}") from None
        argument = Argument(name, argument.type, default, argument.required, argument.description)
    return argument


def schema(text: str) -> dict[str, Argument]:
    """Read a ``schema.hrd``: argument name -> :class:`Argument`, in file order."""
    arguments = {}
    for name, value in parse(text).items():
        if not name.isidentifier():
            raise HrdError(f"{name}: an argument name is a word of letters, digits and '_'")
        arguments[name] = _argument(name, value)
    return arguments


def apply_schema(arguments: dict[str, Argument], given: dict[str, Any]) -> dict[str, Any]:
    """The args of a service: ``given`` checked and coerced, defaults filled in.

    With no schema at all, ``given`` is taken as it is. ValueError names the argument.
    """
    if not arguments:
        return dict(given)
    unknown = [name for name in given if name not in arguments]
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}: the schema has {', '.join(arguments)}")
    result: dict[str, Any] = {}
    for name, argument in arguments.items():
        if name in given and given[name] is not None:
            try:
                result[name] = argument.coerce(given[name])
            except ValueError as exc:
                raise ValueError(f"argument {name!r}: {exc}") from None
        elif argument.required and argument.default is None:
            raise ValueError(f"argument {name!r} is required")
        else:
            result[name] = argument.default
    return result
