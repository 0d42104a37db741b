"""The AYS repository model (names, templates, blueprints, services), and on disk exactly as docs/design.md §7 lays it out::

    <repos>/<repo>/.ays                               repo metadata (JSON): created, blueprint outcomes
    <repos>/<repo>/blueprints/<name>.yaml             "template__instance: {args}" blocks, in file order
    <repos>/<repo>/servicetemplates/<tpl>/schema.hrd  arguments with types and defaults
    <repos>/<repo>/servicetemplates/<tpl>/service.hrd events.<type> = actions; recurring.<action> = 5m
    <repos>/<repo>/servicetemplates/<tpl>/actions.py  def <action>(service, event): ...
    <repos>/<repo>/services/<role>!<instance>/service.json   its args and its state per action

:class:`RepoStore` does blocking file work: call it from a thread (the embedded catalog store,
:mod:`cockpit.backends.embedded.catalog`, does). Every write goes to a temporary file that is
then renamed over the old one, so a crash never leaves half a file. Names are checked against
patterns and every path is checked to stay under the repos root.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cockpit import hrd
from cockpit.decode import TOO_DEEP, DecodeError, decode_yaml
from cockpit.files import write_atomically
from cockpit.hrd import Argument, HrdError, ServiceSpec

TEMPLATE_FILES = ("schema.hrd", "service.hrd", "actions.py")
MAX_FILE = 1024 * 1024  # bytes, for each template file
MAX_BLUEPRINT = 256 * 1024  # bytes of blueprint text
MAX_SERVICES = 500  # service blocks in one blueprint
MAX_ARGS = 64 * 1024  # bytes of one service's arguments, as JSON: they travel with every run

# Names are matched whole (fullmatch: "$" alone would let a trailing newline through). The
# patterns are also the JSON Schema of these names in the API document, so they keep to what
# ECMA-262 regexes have: no lookbehind.
REPO_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9 _.\-]{0,62}[A-Za-z0-9_\-])?$"  # no space or dot at the end
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
BLUEPRINT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}\.ya?ml$"
BLUEPRINT_INPUT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}(\.ya?ml)?$"  # what blueprint_name() takes
_REPO = re.compile(REPO_PATTERN)
_NAME = re.compile(NAME_PATTERN)
_BLUEPRINT = re.compile(BLUEPRINT_PATTERN)


class AysError(Exception):
    """Something the caller asked for cannot be done; ``str()`` says why in a sentence."""


class NotFound(AysError):
    pass


class Conflict(AysError):
    pass


class Invalid(AysError):
    pass


class Unavailable(AysError):
    """The catalog cannot answer now (it is still loading); asking again later may work."""


def check_repo_name(name: str) -> str:
    if not isinstance(name, str) or not _REPO.fullmatch(name):
        raise Invalid(f"{name!r} is not a repository name: 1 to 64 letters, digits, spaces, "
                      "'_', '.' or '-', starting with a letter or digit")
    return name


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise Invalid(f"{name!r} is not a {what} name: 1 to 64 letters, digits, '_', '.' or '-', "
                      "starting with a letter or digit")
    return name


def check_template_name(name: str) -> str:
    check_name(name, "template")
    if "__" in name:
        raise Invalid(f"{name!r} is not a template name: '__' separates template and instance in blueprints")
    return name


def blueprint_name(name: str) -> str:
    """``main`` and ``main.yaml`` are the same blueprint; ``main.yml`` keeps its suffix."""
    if isinstance(name, str) and not name.endswith((".yaml", ".yml")):
        name = name + ".yaml"
    if not isinstance(name, str) or not _BLUEPRINT.fullmatch(name):
        raise Invalid(f"{name!r} is not a blueprint name: letters, digits, '_', '.' or '-', ending in .yaml")
    return name


def split_key(key: str) -> tuple[str, str]:
    """``role!instance`` -> (role, instance), both checked."""
    role, bang, instance = key.partition("!") if isinstance(key, str) else ("", "", "")
    if not bang:
        raise Invalid(f"{key!r} is not a service: expected role!instance")
    return check_name(role, "role"), check_name(instance, "instance")


# ---------------------------------------------------------------------------
# Plain data
# ---------------------------------------------------------------------------

@dataclass
class Template:
    """A service template as loaded: its arguments, subscriptions, periods and action names.

    ``digest`` is the sha256 of its ``actions.py``; ``actions_file`` is where a worker loads
    that file from, set by the store that loaded it (None until then).
    """

    repo: str
    name: str
    arguments: dict[str, Argument] = field(default_factory=dict)
    spec: ServiceSpec = field(default_factory=ServiceSpec)
    actions: tuple[str, ...] = ()
    digest: str = ""
    actions_file: Optional[Path] = None

    def to_dict(self, files: Optional[dict[str, str]] = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "repo": self.repo,
            "actions": list(self.actions),
            "events": {kind: list(actions) for kind, actions in self.spec.events.items()},
            "recurring": dict(self.spec.recurring),
            "schema": {name: {"type": a.type, "default": a.default, "required": a.required,
                              "description": a.description} for name, a in self.arguments.items()},
        }
        if files is not None:
            data["files"] = files
        return data


@dataclass
class ServiceRecord:
    """One service instance: what ``services/<role>!<instance>/service.json`` holds."""

    repo: str
    role: str
    instance: str
    template: str
    args: dict[str, Any] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    blueprint: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.role}!{self.instance}"

    def stored(self) -> dict[str, Any]:
        return {"key": self.key, "role": self.role, "instance": self.instance, "template": self.template,
                "args": self.args, "states": self.states, "created": self.created, "updated": self.updated,
                "blueprint": self.blueprint}

    def to_dict(self, template: Optional[Template]) -> dict[str, Any]:
        data = self.stored()
        data["repo"] = self.repo
        data["events"] = {kind: list(acts) for kind, acts in template.spec.events.items()} if template else {}
        data["recurring"] = dict(template.spec.recurring) if template else {}
        return data


@dataclass
class BlueprintEntry:
    template: str
    instance: str
    args: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.template}!{self.instance}"


NEW_STATUS = {"state": "new", "error": None, "executed": None}


@dataclass
class RepoSnapshot:
    """Everything a process keeps in memory about one repository."""

    name: str
    created: Optional[float]
    templates: dict[str, Template] = field(default_factory=dict)
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # template name -> why it cannot be loaded
    blueprints: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> its last execution
    incarnation: Optional[str] = None  # what tells it from an older repository of the same name


# ---------------------------------------------------------------------------
# Parsing (pure)
# ---------------------------------------------------------------------------

def parse_blueprint(content: str) -> list[BlueprintEntry]:
    """The ``template__instance: {args}`` blocks of a blueprint, in file order; Invalid says what is wrong.

    Bounded (:mod:`cockpit.decode`, MAX_BLUEPRINT, MAX_SERVICES, MAX_ARGS), so a blueprint
    stored once cannot make every run that follows carry megabytes.
    """
    if len(content) > MAX_BLUEPRINT or len(content.encode("utf-8", "surrogatepass")) > MAX_BLUEPRINT:
        raise Invalid(f"the blueprint is larger than {MAX_BLUEPRINT} bytes")
    try:
        data = decode_yaml(content)
    except DecodeError as exc:
        if exc.problem == TOO_DEEP:
            raise Invalid("the blueprint nests lists and mappings too deeply") from None
        problem = exc.problem.replace("invalid YAML", "the blueprint is not valid YAML", 1)
        raise Invalid(f"{exc.where()}: {problem}" if exc.path else problem) from None
    if data is None:
        raise Invalid("the blueprint is empty: expected 'template__instance:' blocks")
    if not isinstance(data, dict):
        raise Invalid("the blueprint must be a mapping of 'template__instance:' blocks")
    if len(data) > MAX_SERVICES:
        raise Invalid(f"the blueprint has {len(data)} service blocks; at most {MAX_SERVICES}")
    entries = []
    for key, args in data.items():
        template, sep, instance = str(key).partition("__")
        if not sep or not template or not instance:
            raise Invalid(f"blueprint block {key!r}: expected template__instance")
        try:
            check_template_name(template)
            check_name(instance, "instance")
        except Invalid as exc:
            raise Invalid(f"blueprint block {key!r}: {exc}") from None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise Invalid(f"blueprint block {key!r}: its arguments must be a mapping, not {type(args).__name__}")
        size = len(json.dumps(args, ensure_ascii=False).encode())
        if size > MAX_ARGS:
            raise Invalid(f"blueprint block {key!r}: its arguments take {size} bytes as JSON; at most {MAX_ARGS}")
        entries.append(BlueprintEntry(template, instance, {str(k): v for k, v in args.items()}))
    return entries


def action_names(source: str, filename: str = "actions.py") -> tuple[str, ...]:
    """The public top-level functions of an ``actions.py``; Invalid on a syntax error."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as exc:
        where = f" line {exc.lineno}" if exc.lineno is not None else ""  # none for a null byte, say
        raise Invalid(f"actions.py{where}: {exc.msg}") from None
    except (RecursionError, MemoryError):  # what Python's parser gives up on: a 100000-term expression
        raise Invalid("actions.py nests its code too deeply for Python to parse") from None
    return tuple(node.name for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"))


def check_template_files(files: Any) -> dict[str, str]:
    """``files`` as a template's files (name -> text), or Invalid saying what is wrong; bounded by MAX_FILE."""
    if not isinstance(files, dict) or not files:
        raise Invalid("files: expected an object of file name -> text, with some of " + ", ".join(TEMPLATE_FILES))
    for file_name, text in files.items():
        if file_name not in TEMPLATE_FILES:
            raise Invalid(f"files: unknown file {file_name!r}: a template has {', '.join(TEMPLATE_FILES)}")
        if not isinstance(text, str):
            raise Invalid(f"files.{file_name}: expected the file's text as a string")
        if len(text) > MAX_FILE or len(check_text(text, f"files.{file_name}")) > MAX_FILE:
            raise Invalid(f"files.{file_name}: larger than {MAX_FILE} bytes")
    return files


def check_text(text: str, what: str) -> bytes:
    """``text`` as UTF-8; Invalid when it holds what UTF-8 cannot (a lone surrogate, from JSON's \\ud800)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{what}: the text holds a lone surrogate, which is not a character") from None


def check_blueprint_content(content: Any) -> str:
    """``content`` as blueprint text that parses; Invalid says why not."""
    if not isinstance(content, str):
        raise Invalid("content: expected the blueprint's YAML text as a string")
    parse_blueprint(content)
    check_text(content, "content")
    return content


def actions_digest(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


def load_template(repo: str, name: str, files: dict[str, str]) -> Template:
    """Build a Template from its files' text; Invalid names the file and the problem."""
    try:
        arguments = hrd.schema(files.get("schema.hrd", ""))
    except HrdError as exc:
        raise Invalid(f"schema.hrd: {exc}") from None
    try:
        spec = hrd.service_spec(files.get("service.hrd", ""))
    except HrdError as exc:
        raise Invalid(f"service.hrd: {exc}") from None
    source = files.get("actions.py", "")
    actions = action_names(source)
    missing = sorted({a for acts in spec.events.values() for a in acts} | set(spec.recurring))
    missing = [a for a in missing if a not in actions]
    if missing:
        raise Invalid(f"service.hrd names action {missing[0]!r}, which actions.py does not define")
    return Template(repo, name, arguments, spec, actions, actions_digest(source))


def service_from_stored(repo: str, data: dict[str, Any]) -> ServiceRecord:
    """A ServiceRecord from what ``stored()`` gave; KeyError or TypeError when it is not one."""
    return ServiceRecord(repo, data["role"], data["instance"], data["template"], dict(data.get("args") or {}),
                         dict(data.get("states") or {}), float(data.get("created") or 0.0),
                         float(data.get("updated") or 0.0), data.get("blueprint"))


# ---------------------------------------------------------------------------
# Disk
# ---------------------------------------------------------------------------

def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1, ensure_ascii=False, default=str).encode()


class RepoStore:
    """Blocking access to the repositories under ``root``: run its methods in a thread."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- paths -------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise Invalid("that name leads outside the repositories directory")
        return path

    def repo_path(self, repo: str) -> Path:
        return self._inside(self.root / check_repo_name(repo))

    def _existing_repo(self, repo: str) -> Path:
        path = self.repo_path(repo)
        if not (path / ".ays").is_file():
            raise NotFound(f"no repository {repo!r}")
        return path

    def template_path(self, repo: str, name: str) -> Path:
        return self._inside(self.repo_path(repo) / "servicetemplates" / check_template_name(name))

    def blueprint_path(self, repo: str, name: str) -> Path:
        return self._inside(self.repo_path(repo) / "blueprints" / blueprint_name(name))

    def service_path(self, repo: str, key: str) -> Path:
        role, instance = split_key(key)
        return self._inside(self.repo_path(repo) / "services" / f"{role}!{instance}")

    # -- repositories -------------------------------------------------------
    def list_repos(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir()
                      if (entry / ".ays").is_file() and _REPO.fullmatch(entry.name))

    def create_repo(self, repo: str, created: float) -> dict[str, Any]:
        """Make ``repo``; ``created`` is the catalog clock's time."""
        path = self.repo_path(repo)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            if (path / ".ays").is_file():
                raise Conflict(f"repository {repo!r} already exists") from None
        for sub in ("blueprints", "servicetemplates", "services"):
            (path / sub).mkdir(exist_ok=True)
        meta = {"name": repo, "created": created, "blueprints": {}}
        write_atomically(path / ".ays", _json(meta))
        return meta

    def delete_repo(self, repo: str) -> None:
        path = self._existing_repo(repo)
        # renamed first, so a half-finished removal never looks like a repository
        doomed = path.with_name(f".deleted-{path.name}-{os.getpid()}-{os.urandom(6).hex()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def read_meta(self, repo: str) -> dict[str, Any]:
        path = self._existing_repo(repo)
        try:
            meta = json.loads((path / ".ays").read_text() or "{}")
        except ValueError:
            meta = {}  # an old or hand-made .ays marker: start the metadata afresh
        if not isinstance(meta, dict):
            meta = {}
        meta.setdefault("name", repo)
        meta.setdefault("created", (path / ".ays").stat().st_mtime)
        if not isinstance(meta.get("blueprints"), dict):
            meta["blueprints"] = {}
        return meta

    def write_meta(self, repo: str, meta: dict[str, Any]) -> None:
        write_atomically(self._existing_repo(repo) / ".ays", _json(meta))

    def load_repo(self, repo: str) -> RepoSnapshot:
        """The repository as the catalog keeps it: templates loaded (or why not), services, blueprints."""
        path = self._existing_repo(repo)
        meta = self.read_meta(repo)
        snapshot = RepoSnapshot(repo, meta.get("created"))
        for name, files in self._templates_files(path).items():
            try:
                template = load_template(repo, name, files)
            except Invalid as exc:
                snapshot.broken[name] = str(exc)
                continue
            template.actions_file = path / "servicetemplates" / name / "actions.py"
            snapshot.templates[name] = template
        snapshot.services = self._services(repo, path)
        statuses = meta["blueprints"]
        snapshot.blueprints = {name: dict(statuses.get(name) or NEW_STATUS) for name in self.list_blueprints(repo)}
        return snapshot

    def read_repo(self, repo: str) -> dict[str, Any]:
        """Everything stored for ``repo``, unparsed: ``created``, ``templates`` (name -> files, broken ones
        too), ``blueprints`` (name -> text), ``statuses`` (name -> status) and ``services`` (ServiceRecords)."""
        path = self._existing_repo(repo)
        meta = self.read_meta(repo)
        blueprints = {}
        for name in self.list_blueprints(repo):
            try:
                blueprints[name] = (path / "blueprints" / name).read_text()
            except (OSError, UnicodeDecodeError):
                continue
        return {"created": meta.get("created"), "templates": self._templates_files(path),
                "blueprints": blueprints,
                "statuses": {name: status for name, status in meta["blueprints"].items()
                             if name in blueprints and isinstance(status, dict)},
                "services": list(self._services(repo, path).values())}

    def _templates_files(self, path: Path) -> dict[str, dict[str, str]]:
        templates = {}
        tdir = path / "servicetemplates"
        for entry in sorted(tdir.iterdir()) if tdir.is_dir() else []:
            if entry.is_dir() and _NAME.fullmatch(entry.name) and "__" not in entry.name:
                templates[entry.name] = self._template_files(entry)
        return templates

    @staticmethod
    def _services(repo: str, path: Path) -> dict[str, ServiceRecord]:
        services: dict[str, ServiceRecord] = {}
        sdir = path / "services"
        for entry in sorted(sdir.iterdir()) if sdir.is_dir() else []:
            try:
                record = service_from_stored(repo, json.loads((entry / "service.json").read_text()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not a service directory (or a torn one from before atomic writes)
            services[record.key] = record
        return services

    # -- templates ----------------------------------------------------------
    @staticmethod
    def _template_files(path: Path) -> dict[str, str]:
        files = {}
        for name in TEMPLATE_FILES:
            try:
                files[name] = (path / name).read_text()
            except (FileNotFoundError, UnicodeDecodeError):
                pass
        return files

    def read_template_files(self, repo: str, name: str) -> dict[str, str]:
        self._existing_repo(repo)
        path = self.template_path(repo, name)
        if not path.is_dir():
            raise NotFound(f"no template {name!r} in repository {repo!r}")
        return self._template_files(path)

    def put_template(self, repo: str, name: str, files: dict[str, Any]) -> tuple[Template, bool]:
        """Replace the template's files with ``files``; fires (template, created)."""
        self._existing_repo(repo)
        path = self.template_path(repo, name)
        check_template_files(files)
        template = load_template(repo, name, files)  # refuses a broken template before writing
        created = not path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        for file_name in TEMPLATE_FILES:
            if file_name in files:
                write_atomically(path / file_name, files[file_name].encode())
            else:
                try:
                    (path / file_name).unlink()
                except FileNotFoundError:
                    pass
        template.actions_file = path / "actions.py"
        return template, created

    # -- blueprints ---------------------------------------------------------
    def list_blueprints(self, repo: str) -> list[str]:
        path = self._existing_repo(repo) / "blueprints"
        return sorted(entry.name for entry in path.iterdir()
                      if entry.is_file() and _BLUEPRINT.fullmatch(entry.name)) if path.is_dir() else []

    def read_blueprint(self, repo: str, name: str) -> str:
        self._existing_repo(repo)
        try:
            return self.blueprint_path(repo, name).read_text()
        except FileNotFoundError:
            raise NotFound(f"no blueprint {blueprint_name(name)!r} in repository {repo!r}") from None

    def write_blueprint(self, repo: str, name: str, content: Any, create: bool) -> str:
        """Store a blueprint (create: it must be new; else: it must exist); fires its name."""
        self._existing_repo(repo)
        path = self.blueprint_path(repo, name)
        check_blueprint_content(content)
        if create and path.exists():
            raise Conflict(f"blueprint {path.name!r} already exists in repository {repo!r}; PUT it to change it")
        if not create and not path.exists():
            raise NotFound(f"no blueprint {path.name!r} in repository {repo!r}")
        write_atomically(path, content.encode())
        return path.name

    def delete_blueprint(self, repo: str, name: str) -> None:
        self._existing_repo(repo)
        try:
            self.blueprint_path(repo, name).unlink()
        except FileNotFoundError:
            raise NotFound(f"no blueprint {blueprint_name(name)!r} in repository {repo!r}") from None
        meta = self.read_meta(repo)
        if meta["blueprints"].pop(blueprint_name(name), None) is not None:
            self.write_meta(repo, meta)

    def set_blueprint_status(self, repo: str, name: str, status: dict[str, Any]) -> bool:
        """Record a blueprint's last execution; False (nothing written) when it is gone."""
        try:
            meta = self.read_meta(repo)
        except NotFound:
            return False
        if not self.blueprint_path(repo, name).is_file():
            return False
        meta["blueprints"][blueprint_name(name)] = status
        self.write_meta(repo, meta)
        return True

    # -- services -----------------------------------------------------------
    def write_service(self, record: ServiceRecord) -> None:
        path = self.service_path(record.repo, record.key)
        if not (self.repo_path(record.repo) / ".ays").is_file():
            return  # the repository was deleted meanwhile: nothing to keep
        write_atomically(path / "service.json", _json(record.stored()))

    def read_service(self, repo: str, key: str) -> Optional[ServiceRecord]:
        try:
            return service_from_stored(repo, json.loads((self.service_path(repo, key) / "service.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def put_service(self, record: ServiceRecord) -> ServiceRecord:
        """Create the service, or change an existing one's template, args and blueprint; its states and
        creation time stay as they are. Fires with what is stored now."""
        self._existing_repo(record.repo)
        old = self.read_service(record.repo, record.key)
        if old is not None:
            record = ServiceRecord(record.repo, record.role, record.instance, record.template, record.args,
                                   old.states, old.created, max(old.updated, record.updated), record.blueprint)
        self.write_service(record)
        return record

    def set_service_states(self, repo: str, key: str, states: dict[str, str], updated: float) -> bool:
        """Set these actions' states of one service (the others stay); False when the service is gone."""
        record = self.read_service(repo, key)
        if record is None:
            return False
        record.states.update(states)
        record.updated = max(record.updated, updated)
        self.write_service(record)
        return True

    def delete_service(self, repo: str, key: str) -> None:
        path = self.service_path(repo, key)
        if not path.is_dir():
            raise NotFound(f"no service {key!r} in repository {repo!r}")
        doomed = path.with_name(f".deleted-{path.name}-{os.getpid()}-{os.urandom(6).hex()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def blueprint_services(repo: str, blueprint: str, entries: list[BlueprintEntry], templates: dict[str, Template],
                       existing: dict[str, ServiceRecord], now: float) -> list[ServiceRecord]:
    """The services a blueprint makes (new) or changes (existing ones keep their states); Invalid says why not."""
    records = []
    for entry in entries:
        template = templates.get(entry.template)
        if template is None:
            raise Invalid(f"blueprint block {entry.template}__{entry.instance}: "
                          f"no template {entry.template!r} in repository {repo!r}")
        try:
            args = hrd.apply_schema(template.arguments, entry.args)
        except ValueError as exc:
            raise Invalid(f"blueprint block {entry.template}__{entry.instance}: {exc}") from None
        old = existing.get(entry.key)
        if old is not None:
            records.append(ServiceRecord(repo, old.role, old.instance, entry.template, args, dict(old.states),
                                         old.created, now, blueprint))
        else:
            records.append(ServiceRecord(repo, entry.template, entry.instance, entry.template, args,
                                         {action: "new" for action in template.actions}, now, now, blueprint))
    return records
