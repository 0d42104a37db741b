"""``cockpit``: a small synchronous client of a running cockpit's REST API (docs/design.md §12).

``send``, ``tail``, ``runs`` and ``config check``. Every failure is one line on stderr and a
non-zero exit: 1 when the cockpit refused the request or could not be reached, 2 for a
usage, input or config mistake. It never prints a traceback.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator, NoReturn, Optional, Sequence, TextIO

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 30.0  # seconds for a request and its reply; the live stream has none
EVENT_TYPES = ("email", "telegram", "alarm", "eco", "generic")


class Failure(Exception):
    """One line for stderr, and the exit status it ends the program with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that says a usage mistake in one line, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        raise Failure(f"{message} (see {self.prog} --help)", 2)


class Client:
    """The REST calls the commands make, with the Bearer token when one is given."""

    def __init__(self, url: str, token: Optional[str]):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Failure(f"{url!r} is not the cockpit's URL: expected http://host:port (--url or $COCKPIT_URL)", 2)
        self.url = url.rstrip("/")
        self.token = token

    def open(self, method: str, path: str, body: Any = None, timeout: Optional[float] = TIMEOUT) -> Any:
        """The response to one request; Failure (status 1) when it is refused or nothing answers."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise Failure(_refusal(exc), 1) from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
            raise Failure(f"cannot reach the cockpit at {self.url}: {reason}", 1) from None
        except (OSError, ValueError) as exc:  # a timeout, a reset, a URL that is no URL
            raise Failure(f"cannot reach the cockpit at {self.url}: {exc}", 1) from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        with self.open(method, path, body) as response:
            try:
                return json.loads(response.read())
            except (ValueError, OSError) as exc:
                raise Failure(f"{self.url}{path} answered no JSON: {exc}", 1) from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    """The server's error sentence, or the HTTP status when it gave none."""
    try:
        error = json.loads(exc.read(65536))["error"]
        if isinstance(error, str) and error:
            return " ".join(error.split())
    except (ValueError, KeyError, TypeError, OSError):
        pass
    return f"HTTP {exc.code} {exc.reason}"


def parse_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` gives the text ``value``; ``key:=json`` gives the JSON value (as in httpie)."""
    from cockpit.decode import DecodeError, decode_json

    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise Failure(f"{pair!r} is not key=value or key:=json", 2)
        if key.endswith(":"):
            key = key[:-1]
            try:
                parsed: Any = decode_json(value)
            except DecodeError as exc:
                raise Failure(f"{key}: {exc}", 2) from None
        else:
            parsed = value
        if not key:
            raise Failure(f"{pair!r} has no key before the =", 2)
        fields[key] = parsed
    return fields


def parse_document(raw: bytes) -> dict[str, Any]:
    """A JSON or YAML document (JSON when it parses as JSON), through the bounded decoder."""
    from cockpit.decode import DecodeError, decode_json, decode_yaml

    try:
        data = decode_json(raw)
    except DecodeError as json_error:
        if raw.lstrip()[:1] in (b"{", b"["):
            raise Failure(f"stdin: {json_error}", 2) from None
        try:
            data = decode_yaml(raw)
        except DecodeError as exc:
            raise Failure(f"stdin: {exc}", 2) from None
    if not isinstance(data, dict):
        raise Failure("stdin: expected one event, an object of fields", 2)
    return data


def live_events(lines: Iterator[bytes]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Events frame in ``lines``; comments and other fields skipped."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def send(client: Client, args: argparse.Namespace, stdin: Any, out: TextIO) -> None:
    if args.fields == ["-"]:
        body = parse_document(stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read())
    elif "-" in args.fields:
        raise Failure("'-' reads the whole event from stdin: give no key=value with it", 2)
    else:
        body = parse_pairs(args.fields)
    reply = client.json("POST", f"/api/events/{urllib.parse.quote(args.type, safe='')}", body)
    out.write(json.dumps(reply) + "\n")


def tail(client: Client, args: argparse.Namespace, stdin: Any, out: TextIO) -> None:
    path = "/api/events/live" + (f"?type={urllib.parse.quote(args.type)}" if args.type else "")
    with client.open("GET", path, timeout=None) as response:
        try:
            for data in live_events(iter(response.readline, b"")):
                out.write(data + "\n")
                out.flush()
        except (OSError, http.client.HTTPException) as exc:  # the cockpit went away mid-stream
            if isinstance(exc, BrokenPipeError):  # our reader went away instead
                raise
            raise Failure(f"the live stream from {client.url} broke: {exc!r}", 1) from None
    raise Failure("the cockpit closed the live stream", 1)


def runs(client: Client, args: argparse.Namespace, stdin: Any, out: TextIO) -> None:
    query = {name: value for name, value in (("service", args.service), ("state", args.state),
                                             ("limit", args.limit)) if value is not None}
    path = "/api/runs" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    for run in client.json("GET", path).get("runs", []):
        out.write(json.dumps(run) + "\n")


def config_check(client: Optional[Client], args: argparse.Namespace, stdin: Any, out: TextIO) -> None:
    # the very checks `twistd cockpit --config FILE` makes before it starts (cockpit.config.load and
    # the listeners'), which write their one line to stderr and exit 2
    from cockpit.tap import Options

    Options().parseOptions(["--config", args.file])
    out.write("ok\n")


def parser() -> argparse.ArgumentParser:
    # --url and --token go before or after the command; SUPPRESS keeps a subcommand's absent
    # option from hiding the one given before it
    common = _Parser(add_help=False)  # of the subparsers' class, as their parents must be
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"the cockpit's base URL (default: $COCKPIT_URL, else {DEFAULT_URL})")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="a Bearer token of its [api] tokens (default: $COCKPIT_TOKEN)")
    top = _Parser(prog="cockpit", parents=[common],
                  description="Talk to a running cockpit over its REST API.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = commands.add_parser("send", parents=[common], help="publish one event",
                            description="Publish an event. key=value sets a text field, key:=json a JSON "
                                        "value (a number, true, a list, an object); a lone - reads the "
                                        "whole event as JSON or YAML from stdin.")
    p.add_argument("type", choices=EVENT_TYPES, metavar="TYPE", help=" | ".join(EVENT_TYPES))
    p.add_argument("fields", nargs="*", metavar="FIELD", help="key=value, key:=json, or -")
    p.set_defaults(run=send)

    p = commands.add_parser("tail", parents=[common], help="print live events, one JSON line each")
    p.add_argument("--type", choices=EVENT_TYPES, help="only events of this type")
    p.set_defaults(run=tail)

    p = commands.add_parser("runs", parents=[common], help="list action runs, newest first, one JSON line each")
    p.add_argument("--service", help="role!instance")
    p.add_argument("--state", help="new, running, ok, error or timeout")
    p.add_argument("--limit", type=int, help="at most this many (default 50)")
    p.set_defaults(run=runs)

    p = commands.add_parser("config", help="configuration files")
    checks = p.add_subparsers(dest="config_command", required=True, parser_class=_Parser, metavar="check")
    c = checks.add_parser("check", help="check a config file as start-up does: ok, or its one-line error")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(run=config_check)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; the exit status."""
    try:
        args = parser().parse_args(argv)
        client = None if args.run is config_check else Client(
            getattr(args, "url", None) or os.environ.get("COCKPIT_URL") or DEFAULT_URL,
            getattr(args, "token", None) or os.environ.get("COCKPIT_TOKEN") or None)
        args.run(client, args, sys.stdin, sys.stdout)
        return 0
    except Failure as exc:
        sys.stderr.write(f"cockpit: {exc}\n")
        return exc.status
    except KeyboardInterrupt:  # Ctrl-C ends a tail; nothing to say
        return 0
    except BrokenPipeError:  # `cockpit tail | head`: the reader left
        # stdout's buffer would fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug here: still one line, never a traceback
        sys.stderr.write(f"cockpit: unexpected {type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
