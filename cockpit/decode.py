"""Untrusted JSON and YAML text to plain data, within bounds, or a sentence that says why not.

Everything the cockpit reads from outside (event bodies, webhook payloads, blueprints)
comes through here, so the bounds hold everywhere:

- nesting: at most ``MAX_DEPTH`` levels of lists and objects (the bus reads its entries
  back with pydantic's JSON parser, which stops at 200);
- YAML aliases: a shared node is one object however many paths reach it, and the checks
  visit it once. What aliases add once expanded is bounded (``MAX_ALIAS_EXPANSION``:
  each value counts one, text its length too), so a few hundred bytes of nested anchors
  (a "billion laughs"), or one long text aliased many times, are refused after work in
  proportion to the text, never in proportion to what it would expand to. A recursive
  alias is refused;
- values: only what JSON carries and reads back equal. Text must be encodable as UTF-8
  (no lone surrogates), integers have at most ``MAX_INT_DIGITS`` digits (Python's own
  limit for reading them back), numbers are finite, and object keys are text.

YAML is read as YAML 1.1, as PyYAML's safe loader reads it, except that a timestamp keeps
its text (it is checked to be a real date or time) and tags outside the JSON data model
(``!!binary``, ``!!set``, ...) are refused.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

try:  # the C parser is several times faster on big payloads
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader

MAX_DEPTH = 64
MAX_ALIAS_EXPANSION = 1_000_000  # what aliases may add to a document once expanded: values, and text's length
MAX_INT_DIGITS = 4300  # sys.int_info.default_max_str_digits: what Python reads back from text
_INT_BOUND = 10 ** MAX_INT_DIGITS  # what has more digits is refused
_MAX_INT_BITS = _INT_BOUND.bit_length()
# longer than this, an integer scalar cannot be within MAX_INT_DIGITS digits (signs, "0x",
# underscores and sexagesimal colons aside): refused before it is converted at all
_MAX_INT_TEXT = MAX_INT_DIGITS + 200
TOO_DEEP = f"the data nests lists and objects deeper than {MAX_DEPTH} levels"

_TAG = "tag:yaml.org,2002:"
_SCALARS = {_TAG + name for name in ("null", "bool", "int", "float", "str", "timestamp")}
_constructor = yaml.constructor.SafeConstructor()


class DecodeError(ValueError):
    """Text that is not acceptable data; ``problem`` says why and ``path`` where (``()``: the top)."""

    def __init__(self, problem: str, path: tuple[Union[str, int], ...] = ()):
        super().__init__(problem)
        self.problem = problem
        self.path = path

    def where(self, top: str = "(top)") -> str:
        """The path as ``args.items[2].name``; ``top`` for the document itself."""
        return format_path(self.path) or top

    def __str__(self) -> str:
        return f"{self.where()}: {self.problem}" if self.path else self.problem


def format_path(path: tuple[Union[str, int], ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------

class _LongInteger(str):
    """An integer literal too long to convert: kept as its text, refused by :func:`check`."""


class _Constant(str):
    """NaN or Infinity, which Python's json reads but JSON has not: refused by :func:`check`."""


def _parse_int(text: str) -> Any:
    digits = len(text) - (text[0] == "-")
    return int(text) if digits <= MAX_INT_DIGITS else _LongInteger(text)




def decode_json(raw: Union[bytes, str]) -> Any:
    """Parse JSON text and :func:`check` it; DecodeError says what is wrong and where."""
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_constant=_Constant)
    except UnicodeError:
        raise DecodeError("invalid JSON: the text is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DecodeError(TOO_DEEP) from None
    check(data)
    return data


# ---------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------

def _yaml_error(exc: yaml.YAMLError, raw: Union[bytes, str]) -> DecodeError:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    if "nesting depth" in problem:  # libyaml's own limit, past ours
        return DecodeError(TOO_DEEP)
    mark = getattr(exc, "problem_mark", None)
    where = ""
    if mark is not None:
        where = f" at line {mark.line + 1}, column {mark.column + 1}"
        if _char_at(raw, mark.line, mark.column) == "\t":
            problem = "a tab character; YAML indents with spaces, never tabs"
    return DecodeError(f"invalid YAML{where}: {problem}")


def _char_at(raw: Union[bytes, str], line: int, column: int) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    start = 0
    for _ in range(line):  # bounded by the text: one find per line before the mark
        start = text.find("\n", start) + 1
        if start == 0:
            return ""
    return text[start + column:start + column + 1]


def _mark(node: Node) -> str:
    mark = node.start_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _bound_graph(root: Node) -> None:
    """Refuse a node graph that is recursive, too deep, or that aliases expand past the bound.

    Each node is visited once, however many aliases reach it: the work is in proportion
    to the text. ``size`` is what a node weighs once every alias is expanded: one for each
    value, plus the length of each text.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    distinct = 0  # what the nodes weigh, each counted once
    stack: list[tuple[Node, bool]] = [(root, False)]
    entered: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            children = _children(node)
            size[key] = _weight(node) + sum(size[id(child)] for child in children)
            container = isinstance(node, (MappingNode, SequenceNode))
            depth[key] = max((depth[id(child)] for child in children), default=0) + (1 if container else 0)
            continue
        if key in size:
            continue
        if key in entered:  # entered, not finished: this node contains itself
            raise DecodeError(f"the YAML has a recursive alias{_mark(node)}: a node cannot contain itself")
        entered.add(key)
        distinct += _weight(node)
        stack.append((node, True))
        for child in _children(node):
            if id(child) not in size:
                if id(child) in entered:
                    raise DecodeError(f"the YAML has a recursive alias{_mark(child)}: a node cannot contain itself")
                stack.append((child, False))
    if depth[id(root)] > MAX_DEPTH:
        raise DecodeError(TOO_DEEP)
    if size[id(root)] - distinct > MAX_ALIAS_EXPANSION:
        raise DecodeError(f"the YAML's aliases expand it by more than {MAX_ALIAS_EXPANSION} values and "
                          "characters; write the data out, or share less")


def _weight(node: Node) -> int:
    return len(node.value) + 1 if isinstance(node, ScalarNode) else 1


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        items: list[Node] = node.value
        return items
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _scalar(node: ScalarNode, path: tuple[Union[str, int], ...]) -> Any:
    tag = node.tag
    if tag not in _SCALARS:
        raise DecodeError(f"the YAML tag {tag.replace(_TAG, '!!')} is not accepted{_mark(node)}: "
                          "only text, numbers, booleans, null, lists and mappings", path)
    if tag == _TAG + "int" and len(node.value) > _MAX_INT_TEXT:
        raise DecodeError(f"an integer of more than {MAX_INT_DIGITS} digits", path)
    try:
        # the tag's own function, not construct_object: that one caches every node it saw
        value = _constructor.yaml_constructors[tag](_constructor, node)
    except (ValueError, OverflowError, yaml.YAMLError) as exc:
        what = "date or time" if tag == _TAG + "timestamp" else tag.replace(_TAG, "")
        raise DecodeError(f"{node.value[:40]!r} is not a valid {what} ({exc}); quote it to send it as text",
                          path) from None
    if tag == _TAG + "timestamp":
        return node.value  # checked; kept as written, since JSON has no dates
    return value


def _build(root: Node) -> Any:
    """Plain data from a bounded node graph: each node built once, shared where the YAML shares it."""
    built: dict[int, Any] = {}
    # (node, path, children done?); paths are kept for errors and are those of the first visit
    stack: list[tuple[Node, tuple[Union[str, int], ...], bool]] = [(root, (), False)]
    while stack:
        node, path, done = stack.pop()
        key = id(node)
        if key in built and not done:
            continue
        if isinstance(node, ScalarNode):
            built[key] = _scalar(node, path)
        elif not done:
            stack.append((node, path, True))
            if isinstance(node, SequenceNode):
                stack.extend((child, (*path, i), False) for i, child in enumerate(node.value))
            else:
                for k, v in node.value:
                    if k.tag != _TAG + "merge":
                        stack.append((k, path, False))
                    label: Union[str, int] = k.value if isinstance(k, ScalarNode) else "?"
                    stack.append((v, (*path, label), False))
        elif isinstance(node, SequenceNode):
            built[key] = [built[id(child)] for child in node.value]
        else:
            built[key] = _mapping(node, path, built)
    return built[id(root)]


def _mapping(node: MappingNode, path: tuple[Union[str, int], ...], built: dict[int, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for k, v in node.value:
        if k.tag == _TAG + "merge":  # "<<: *defaults": the merged keys give way to the mapping's own
            sources = built[id(v)]
            for source in sources if isinstance(sources, list) else [sources]:
                if not isinstance(source, dict):
                    raise DecodeError(f"'<<' merges mappings only{_mark(v)}", path)
                for name, value in source.items():
                    merged.setdefault(name, value)
            continue
        name = built[id(k)]
        if not isinstance(name, str):
            hint = " (YAML reads yes/no/on/off as booleans)" if isinstance(name, bool) else ""
            raise DecodeError(f"the key {k.value if isinstance(k, ScalarNode) else '?'!r} is not text{hint}; "
                              "quote it", path)
        own[name] = built[id(v)]
    if not merged:
        return own
    merged.update(own)
    return merged


def decode_yaml(raw: Union[bytes, str]) -> Any:
    """Parse one YAML document within the bounds and :func:`check` it; DecodeError says why not.

    An empty document is None.
    """
    try:
        root = yaml.compose(raw, Loader=_Loader)
    except UnicodeError:  # bytes that are not UTF-8, or text with a lone surrogate
        raise DecodeError("invalid YAML: the text is not UTF-8") from None
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, raw) from None
    except RecursionError:
        raise DecodeError(TOO_DEEP) from None
    if root is None:
        return None
    _bound_graph(root)
    data = _build(root)
    check(data)
    return data


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------

def check(data: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise DecodeError (with the path) unless ``data`` is JSON data that reads back equal.

    Walks by path, not by object: the caller bounds what shared objects expand to.
    """
    stack: list[tuple[Any, tuple[Union[str, int], ...], int]] = [(data, (), 0)]
    pop, push = stack.pop, stack.append
    while stack:
        value, path, depth = pop()
        kind = type(value)
        if kind is str:
            if not value.isascii():
                _check_text(value, path)
        elif kind is dict:
            if depth >= max_depth:
                raise DecodeError(TOO_DEEP)
            for key, item in value.items():
                if type(key) is not str:
                    raise DecodeError(f"the key {key!r} is not text", path)
                if not key.isascii():
                    _check_text(key, path)
                push((item, (*path, key), depth + 1))
        elif kind is list:
            if depth >= max_depth:
                raise DecodeError(TOO_DEEP)
            for i, item in enumerate(value):
                push((item, (*path, i), depth + 1))
        elif kind is int:
            bits = value.bit_length()
            if bits > _MAX_INT_BITS or (bits == _MAX_INT_BITS and abs(value) >= _INT_BOUND):
                raise DecodeError(f"an integer of more than {MAX_INT_DIGITS} digits", path)
        elif kind is float:
            if not math.isfinite(value):
                raise DecodeError(f"{value} is not a finite number", path)
        elif kind is _Constant:
            raise DecodeError(f"{value} is not a JSON number: JSON has no NaN or infinity", path)
        elif kind is _LongInteger:
            raise DecodeError(f"an integer of {len(value.lstrip('-'))} digits; at most {MAX_INT_DIGITS}", path)
        elif value is None or kind is bool:
            pass
        elif isinstance(value, (str, int, float, dict, list)):  # subclasses: checked as what they are
            push((_plain(value), path, depth))
        else:
            raise DecodeError(f"a {kind.__name__} is not JSON data", path)


_PLAIN_BASES: tuple[type[Any], ...] = (bool, str, int, float, dict, list)


def _plain(value: Any) -> Any:
    for base in _PLAIN_BASES:
        if isinstance(value, base):
            return base(value)
    return value  # pragma: no cover - only called for those


def _check_text(text: str, path: tuple[Union[str, int], ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise DecodeError(f"the text holds a lone surrogate (\\u{ord(bad):04x}), which UTF-8 cannot carry",
                          path) from None


def depth_ok(data: Any, max_depth: Optional[int] = None) -> bool:
    """Whether ``data`` nests within ``max_depth`` (default MAX_DEPTH) levels."""
    try:
        check(data, max_depth or MAX_DEPTH)
    except DecodeError as exc:
        return exc.problem != TOO_DEEP
    return True
