"""The cockpit's configuration: TOML (stdlib ``tomllib``) read into typed, validated settings.

Every key has a default, so an empty file (or none at all) gives a working cockpit.
A bad file raises :class:`ConfigError` whose message is one line naming the file,
the key and what was expected.
"""
from __future__ import annotations

import difflib
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional, Union
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is a one-line explanation."""


Port = Annotated[int, Field(ge=0, le=65535)]


class Section(BaseModel):
    # strict: a TOML string "5000" for a port is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CockpitSection(Section):
    data_dir: str = "./cockpit-data"
    public_url: Optional[str] = None  # default: derived from [api]
    python_path: list[str] = []  # directories [[servers]] extensions are imported from, before sys.path


class RedisSection(Section):
    url: str = "redis://127.0.0.1:6379/0"
    stream_maxlen: Annotated[int, Field(gt=0)] = 100000
    max_deliveries: Annotated[int, Field(gt=0)] = 5  # then the entry moves to ckpt.dead
    claim_idle: Annotated[float, Field(gt=0)] = 60.0  # seconds before a pending entry is reclaimed
    timeout: Annotated[float, Field(gt=0)] = 5.0  # seconds to wait for a reply before giving up
    # seconds a consumer may go without a heartbeat (it beats every fifth of it) before the
    # others take over its entries and remove it from its group
    consumer_timeout: Annotated[float, Field(ge=1)] = 10.0

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("a redis://, rediss:// or unix:// URL")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("a URL with a host, such as redis://127.0.0.1:6379/0")
        path = parts.path.strip("/")
        if parts.scheme != "unix" and path and not path.isdigit():
            raise ValueError("a database number after the host, such as redis://host:6379/0")
        return value

    def connection(self) -> dict[str, Any]:
        """The parts of ``url`` that a client connects with."""
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return {"path": parts.path, "host": None, "port": None, "db": 0, "tls": False,
                    "password": unquote(parts.password) if parts.password else None,
                    "username": unquote(parts.username) if parts.username else None}
        path = parts.path.strip("/")
        return {
            "host": parts.hostname,
            "port": parts.port or 6379,
            "db": int(path) if path else 0,
            "password": unquote(parts.password) if parts.password else None,
            "username": unquote(parts.username) if parts.username else None,
            "tls": parts.scheme == "rediss",
            "path": None,
        }

    def redacted_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.password:
            netloc = parts.netloc.rsplit("@", 1)[1]
            return f"{parts.scheme}://***@{netloc}{parts.path}"
        return self.url


class ListenSection(Section):
    host: str = "127.0.0.1"
    port: Port = 0
    listen: Optional[str] = None  # a Twisted endpoint string; wins over host/port

    def endpoint(self) -> str:
        if self.listen:
            return self.listen
        host = self.host.replace(":", "\\:")  # IPv6 addresses need their colons escaped
        return f"tcp:{self.port}:interface={host}"


class ApiSection(ListenSection):
    port: Port = 8080
    tokens: list[str] = []
    github_secret: Optional[str] = None
    max_body: Annotated[int, Field(gt=0)] = 1048576
    header_timeout: Annotated[float, Field(gt=0)] = 10.0  # seconds from a request's first byte to its last header
    body_timeout: Annotated[float, Field(gt=0)] = 60.0  # seconds from the end of the headers to the end of the body
    idle_timeout: Annotated[float, Field(gt=0)] = 60.0  # seconds a kept-alive connection waits for its next request
    live_backlog: Annotated[int, Field(gt=0)] = 4194304  # bytes of events held for an SSE client that does not read


class RelaySection(Section):
    host: str = "127.0.0.1"
    port: Port = 25
    username: Optional[str] = None
    password: Optional[str] = None
    starttls: bool = False
    tls: bool = False  # implicit TLS, as on port 465
    sender: str = "cockpit@localhost"
    timeout: Annotated[float, Field(gt=0)] = 30.0
    retries: Annotated[int, Field(ge=0)] = 5
    ca_cert: Optional[str] = None  # PEM of the CA that signs the relay's certificate; default: the system's


class MailSection(ListenSection):
    port: Port = 2525
    hostname: str = Field(default_factory=socket.getfqdn)  # the greeting's host name
    domains: list[str] = []
    max_size: Annotated[int, Field(gt=0)] = 26214400
    tls_cert: Optional[str] = None  # PEM with certificate and key; enables STARTTLS
    tls_key: Optional[str] = None  # when the key is in a file of its own
    users: dict[str, str] = {}  # name -> password for AUTH PLAIN/LOGIN, offered only after STARTTLS
    auth_failures: Annotated[int, Field(gt=0, le=100)] = 3  # failed AUTHs per connection; the last gets 421
    auth_delay: Annotated[float, Field(ge=0, le=60)] = 1.0  # seconds before a failed AUTH's 535; doubles each time
    auth_peer_failures: Annotated[int, Field(ge=0)] = 10  # failed AUTHs per address in auth_peer_window; 0: any
    auth_peer_window: Annotated[float, Field(gt=0)] = 900.0  # seconds an address is counted for, then refused
    parsers: Annotated[int, Field(ge=0, le=64)] = 2  # parser processes for big mail and mail with files; 0: threads
    parse_timeout: Annotated[float, Field(gt=0)] = 60.0  # seconds a parser may spend on one message
    relay: Optional[RelaySection] = None


class BotSection(Section):
    token: Optional[str] = None
    api_url: str = "https://api.telegram.org"
    allowed_users: list[Union[int, str]] = []
    notify_chats: list[Union[int, str]] = []


class AysSection(Section):
    repos: Optional[str] = None  # default: <data_dir>/repos
    workers: Annotated[int, Field(gt=0, le=256)] = 4
    action_timeout: Annotated[float, Field(gt=0)] = 300.0
    # bytes of data (RLIMIT_DATA) a worker, and each process its action starts, may hold
    action_memory: Annotated[int, Field(ge=64 * 1024 * 1024)] = 1024 * 1024 * 1024
    keep_days: Annotated[float, Field(gt=0)] = 30.0  # run history: runs older than this are pruned
    keep_runs: Annotated[int, Field(gt=0)] = 100000  # run history: at most this many runs are kept


class GroupsSection(Section):
    keep_days: Annotated[float, Field(gt=0)] = 30.0  # closed and resolved groups are pruned after this
    samples: Annotated[int, Field(gt=0, le=1000)] = 20  # latest occurrences kept per group


class SentrySection(Section):
    keys: list[str] = []  # accepted DSN keys (the public key before the @); empty: Sentry ingest is refused
    projects: dict[str, str] = {}  # project id -> name, the eco's app_name


class NotifySection(Section):
    repeat: Annotated[float, Field(ge=60)] = 14400.0  # seconds before an open, unacked group is notified again
    mail_to: list[str] = []  # notices by mail too, through [mail.relay], to these addresses


EXTENSION_NAME = r"^[a-z0-9-]{1,32}$"
# module:attribute, as in a console script entry point
EXTENSION_TARGET = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class ServerSection(Section):
    """One ``[[servers]]`` table: the operator's own WSGI app or service, in the cockpit's process."""

    name: Annotated[str, Field(pattern=EXTENSION_NAME)]
    wsgi: Optional[Annotated[str, Field(pattern=EXTENSION_TARGET)]] = None  # "module:app"
    service: Optional[Annotated[str, Field(pattern=EXTENSION_TARGET)]] = None  # "module:factory"
    listen: Optional[str] = None  # a wsgi app's own endpoint, e.g. "tcp:8081:interface=127.0.0.1"
    mount: Optional[str] = None  # or "/ext/<name>" on the main site
    public: bool = False  # a mounted app without [api] tokens
    threads: Annotated[int, Field(ge=1, le=200)] = 10  # a wsgi app's thread pool
    settings: dict[str, Any] = {}  # the extension's own table, handed to it as it is

    @model_validator(mode="after")
    def _one_kind(self) -> "ServerSection":
        if (self.wsgi is None) == (self.service is None):
            raise ValueError("set one of wsgi = \"module:app\" or service = \"module:factory\"")
        if self.service is not None:
            for key in ("listen", "mount"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is for a wsgi app; a service listens by itself if it wants to")
            if self.public:
                raise ValueError("public is for a mounted wsgi app")
            return self
        if (self.listen is None) == (self.mount is None):
            raise ValueError(f"a wsgi app needs one of listen = \"tcp:PORT\" or mount = \"/ext/{self.name}\"")
        if self.mount is not None and self.mount.rstrip("/") != f"/ext/{self.name}":
            raise ValueError(f"mount must be \"/ext/{self.name}\" (its name), got {self.mount!r}")
        if self.public and self.mount is None:
            raise ValueError("public is for a mounted app; an app on its own listen answers whoever reaches it")
        return self

    @property
    def kind(self) -> str:
        return "wsgi" if self.wsgi is not None else "service"

    @property
    def target(self) -> str:
        return self.wsgi or self.service or ""


class Config(Section):
    cockpit: CockpitSection = CockpitSection()
    redis: Optional[RedisSection] = None  # absent: the embedded in-process bus
    api: ApiSection = ApiSection()
    mail: MailSection = MailSection()
    bot: BotSection = BotSection()
    ays: AysSection = AysSection()
    groups: GroupsSection = GroupsSection()
    sentry: SentrySection = SentrySection()
    notify: NotifySection = NotifySection()
    servers: list[ServerSection] = []
    source: str = Field(default="(embedded defaults)", exclude=True)

    @field_validator("servers")
    @classmethod
    def _unique_names(cls, servers: list[ServerSection]) -> list[ServerSection]:
        seen: set[str] = set()
        for server in servers:
            if server.name in seen:
                raise ValueError(f"two servers are named {server.name!r}; each name is its own")
            seen.add(server.name)
        return servers

    @property
    def data_dir(self) -> Path:
        return Path(self.cockpit.data_dir)

    @property
    def repos_dir(self) -> Path:
        return Path(self.ays.repos) if self.ays.repos else self.data_dir / "repos"

    @property
    def public_url(self) -> str:
        if self.cockpit.public_url:
            return self.cockpit.public_url.rstrip("/")
        host = self.api.host if self.api.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.api.port}"


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "greater_than": "a number greater than {gt}",
    "greater_than_equal": "a number of at least {ge}",
    "less_than_equal": "a number of at most {le}",
}


_PATTERNS = {
    EXTENSION_NAME: "a name of 1 to 32 lower-case letters, digits or '-'",
    EXTENSION_TARGET: "module:attribute, such as hooks:app",
}


def _describe(error: ErrorDetails, source: str, data: Optional[dict[str, Any]] = None) -> str:
    # a union member's name ("int", "str") or a validator's is no part of the key path
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("int", "str", "function-"))]
    where = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else f"{loc[0]}" if loc else "(top)"
    if len(loc) > 1 and loc[0] == "servers" and loc[1].isdigit():
        where = f"[[servers]] {_server_name(data, int(loc[1]))}" + (f" {'.'.join(loc[2:])}" if loc[2:] else "")
    elif loc == ["servers"]:  # the list as a whole, as the duplicate names are: named as the file writes it
        where = "[[servers]]"
    kind = error["type"]
    if kind == "extra_forbidden":
        if len(loc) == 1 and isinstance(error.get("input"), dict):  # a table: a section of its own
            close = difflib.get_close_matches(loc[0], sorted(set(Config.model_fields) - {"source"}), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            return f"{source}: [{loc[0]}]: unknown section{hint}"
        return f"{source}: {where}: unknown key"
    if kind == "value_error" and loc and loc[0] == "servers":  # a sentence of its own
        return f"{source}: {where}: {error.get('ctx', {}).get('error', error['msg'])}"
    if kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") in _PATTERNS:
        expected = _PATTERNS[error["ctx"]["pattern"]]
    elif kind in _EXPECTED:
        expected = _EXPECTED[kind].format(**error.get("ctx", {}))
    elif kind == "value_error":
        expected = str(error.get("ctx", {}).get("error", error["msg"]))
    else:
        expected = error["msg"][0].lower() + error["msg"][1:]
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f", got {got!r}"
    return f"{source}: {where}: expected {expected}{shown}"


def _server_name(data: Optional[dict[str, Any]], index: int) -> str:
    """How an error names the ``index``-th ``[[servers]]`` table: its name, else its place."""
    servers = (data or {}).get("servers")
    if isinstance(servers, list) and index < len(servers) and isinstance(servers[index], dict):
        name = servers[index].get("name")
        if isinstance(name, str) and name:
            # as start-up's other lines name it; quoted when it is not a valid name itself
            return name if re.fullmatch(EXTENSION_NAME[1:-1], name) else repr(name)
    return f"#{index + 1}"


def from_dict(data: dict[str, Any], source: str = "(config)") -> Config:
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], source, data)) from None


def load(path: Optional[str]) -> Config:
    """Read the config file at ``path`` (``None``: the embedded defaults)."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "source" in data:
        raise ConfigError(f"{path}: source: unknown key")
    return from_dict(data, source=path)
