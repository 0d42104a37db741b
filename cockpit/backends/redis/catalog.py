"""The AYS catalog in Redis: one catalog for every cockpit process on it (docs/design.md §9).

Keys (``<repo>`` is a repository name and ``<key>`` a ``role!instance``; neither holds ``:``)::

    ckpt.ays.repos                  hash    repo -> {"created", "incarnation"} (JSON)
    ckpt.ays.templates:<repo>       hash    template -> its files {"schema.hrd", "service.hrd", "actions.py"} (JSON)
    ckpt.ays.blueprints:<repo>      hash    blueprint -> its YAML text
    ckpt.ays.bpstatus:<repo>        hash    blueprint -> its last execution {"state", "error", "executed"} (JSON)
    ckpt.ays.services:<repo>        set     the <key> of each service
    ckpt.ays.service:<repo>:<key>   hash    record -> {"role", "instance", "template", "args", "blueprint"} (JSON),
                                            created, updated (seconds), state:<action> -> new|running|ok|error|timeout
    ckpt.ays.version                string  how many changes were made: the version of the catalog
    ckpt.ays.changes                stream  the change feed, MAXLEN ~ 10000: one entry per change, with
                                            v (the version it made), kind (repo, template, blueprint, service, or
                                            catalog: load it all again), repo, name (template, blueprint or <key>)
    ckpt.ays.imported               hash    <host>:<repos directory> -> {"at", "repos", "skipped"} (JSON): the
                                            directories imported on a first start with Redis

Every change is one Lua script: it checks what must or must not exist, changes what it
names, INCRs ``ckpt.ays.version`` and XADDs the feed entry, all in one atomic step. An action
state is one hash field, set on its own (HSET ``state:<action>``): no process writes back a
whole service. A reader catches up with one script too (:data:`_CHANGES`): the entries after
its position, each with the current value of the object it names, read at one version.

Workers load ``actions.py`` from a file: each template's is written to
``<data_dir>/actions/<sha256>.py`` (content-addressed, atomically, in a thread) when the
template is read, before any run can need it.
"""
from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any, Generator, Optional

import txredisapi
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit.ays_catalog import CatalogStore, Change, Changes, Loaded, Position, RepoMeta
from cockpit.backends.redis.bus import RedisBus
from cockpit.backends.redis.script import Script
from cockpit.bus import BusUnavailable
from cockpit.files import write_atomically
from cockpit.repos import (NEW_STATUS, Conflict, Invalid, NotFound, RepoSnapshot, RepoStore, ServiceRecord, Template,
                           blueprint_name, check_template_files, load_template)

log = Logger()

PREFIX = "ckpt.ays."
REPOS = PREFIX + "repos"
TEMPLATES = PREFIX + "templates:"
BLUEPRINTS = PREFIX + "blueprints:"
BPSTATUS = PREFIX + "bpstatus:"
SERVICES = PREFIX + "services:"
SERVICE = PREFIX + "service:"
VERSION = PREFIX + "version"
CHANGES = PREFIX + "changes"
IMPORTED = PREFIX + "imported"
CHANGES_MAXLEN = 10000
FEED_BLOCK_MS = 5000  # how long one wait for a change lasts before it is asked again
DECODE_INLINE = 64 * 1024  # bytes of service records decoded on the reactor thread; more go to a thread


def service_key(repo: str, key: str) -> str:
    return f"{SERVICE}{repo}:{key}"


_PRELUDE = f"""
local CAP = ARGV[1]
local function change(kind, repo, name)
  local v = redis.call('INCR', '{VERSION}')
  redis.call('XADD', '{CHANGES}', 'MAXLEN', '~', CAP, '*', 'v', v, 'kind', kind, 'repo', repo, 'name', name)
  return v
end
local function bump(h, updated)
  local old = redis.call('HGET', h, 'updated')
  if not old or tonumber(updated) > tonumber(old) then redis.call('HSET', h, 'updated', updated) end
end
"""

# ARGV: cap, repo, meta. 0: it exists.
_CREATE_REPO = _PRELUDE + f"""
if redis.call('HSETNX', '{REPOS}', ARGV[2], ARGV[3]) == 0 then return 0 end
return change('repo', ARGV[2], '')
"""

# ARGV: cap, repo. 0: there is none.
_DELETE_REPO = _PRELUDE + f"""
local repo = ARGV[2]
if redis.call('HDEL', '{REPOS}', repo) == 0 then return 0 end
for _, key in ipairs(redis.call('SMEMBERS', '{SERVICES}' .. repo)) do
  redis.call('DEL', '{SERVICE}' .. repo .. ':' .. key)
end
redis.call('DEL', '{SERVICES}' .. repo, '{TEMPLATES}' .. repo, '{BLUEPRINTS}' .. repo, '{BPSTATUS}' .. repo)
return change('repo', repo, '')
"""

# ARGV: cap, repo, template, files. {version, created}; version 0: no such repo.
_PUT_TEMPLATE = _PRELUDE + f"""
if redis.call('HEXISTS', '{REPOS}', ARGV[2]) == 0 then return {{0, 0}} end
local created = redis.call('HSET', '{TEMPLATES}' .. ARGV[2], ARGV[3], ARGV[4])
return {{change('template', ARGV[2], ARGV[3]), created}}
"""

# ARGV: cap, repo, blueprint, content, "1" to create (else replace), status. 0: no repo, -1: it exists, -2: it does not.
_PUT_BLUEPRINT = _PRELUDE + f"""
local repo, name = ARGV[2], ARGV[3]
if redis.call('HEXISTS', '{REPOS}', repo) == 0 then return 0 end
local exists = redis.call('HEXISTS', '{BLUEPRINTS}' .. repo, name)
if ARGV[5] == '1' and exists == 1 then return -1 end
if ARGV[5] ~= '1' and exists == 0 then return -2 end
redis.call('HSET', '{BLUEPRINTS}' .. repo, name, ARGV[4])
redis.call('HSET', '{BPSTATUS}' .. repo, name, ARGV[6])
return change('blueprint', repo, name)
"""

# ARGV: cap, repo, blueprint. 0: no repo, -2: no blueprint.
_DELETE_BLUEPRINT = _PRELUDE + f"""
local repo, name = ARGV[2], ARGV[3]
if redis.call('HEXISTS', '{REPOS}', repo) == 0 then return 0 end
if redis.call('HDEL', '{BLUEPRINTS}' .. repo, name) == 0 then return -2 end
redis.call('HDEL', '{BPSTATUS}' .. repo, name)
return change('blueprint', repo, name)
"""

# ARGV: cap, repo, blueprint, status. 0: the blueprint is gone (nothing written).
_SET_BLUEPRINT_STATUS = _PRELUDE + f"""
local repo, name = ARGV[2], ARGV[3]
if redis.call('HEXISTS', '{BLUEPRINTS}' .. repo, name) == 0 then return 0 end
redis.call('HSET', '{BPSTATUS}' .. repo, name, ARGV[4])
return change('blueprint', repo, name)
"""

# ARGV: cap, repo, then per service: key, record, created, updated, n, n x (action, state) for a new one.
# {version, hash of each service as it is now...}; version 0: no such repo.
_PUT_SERVICES = _PRELUDE + f"""
local repo = ARGV[2]
if redis.call('HEXISTS', '{REPOS}', repo) == 0 then return {{0}} end
local out = {{0}}
local i = 3
while i <= #ARGV do
  local key, n = ARGV[i], tonumber(ARGV[i + 4])
  local h = '{SERVICE}' .. repo .. ':' .. key
  local new = redis.call('SADD', '{SERVICES}' .. repo, key) == 1
  redis.call('HSET', h, 'record', ARGV[i + 1])
  redis.call('HSETNX', h, 'created', ARGV[i + 2])
  bump(h, ARGV[i + 3])
  if new then
    for j = 0, n - 1 do redis.call('HSETNX', h, 'state:' .. ARGV[i + 5 + 2 * j], ARGV[i + 6 + 2 * j]) end
  end
  out[1] = change('service', repo, key)
  out[#out + 1] = redis.call('HGETALL', h)
  i = i + 5 + 2 * n
end
return out
"""

# ARGV: cap, repo, key. 0: no such service.
_DELETE_SERVICE = _PRELUDE + f"""
local repo, key = ARGV[2], ARGV[3]
if redis.call('SREM', '{SERVICES}' .. repo, key) == 0 then return 0 end
redis.call('DEL', '{SERVICE}' .. repo .. ':' .. key)
return change('service', repo, key)
"""

# ARGV: cap, then per service: repo, key, updated, n, n x (action, state). The version each made (0: it is gone).
_SET_STATES = _PRELUDE + f"""
local out = {{}}
local i = 2
while i <= #ARGV do
  local repo, key, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 3])
  local h = '{SERVICE}' .. repo .. ':' .. key
  if redis.call('EXISTS', h) == 1 then
    for j = 0, n - 1 do redis.call('HSET', h, 'state:' .. ARGV[i + 4 + 2 * j], ARGV[i + 5 + 2 * j]) end
    bump(h, ARGV[i + 2])
    out[#out + 1] = change('service', repo, key)
  else
    out[#out + 1] = 0
  end
  i = i + 4 + 2 * n
end
return out
"""

# ARGV: the id after which to read, how many. {version, {id, v, kind, repo, name, latest, value}...}: the
# value is what the entry names as it is now, given with the last entry that names it only.
_CHANGES = f"""
local version = redis.call('GET', '{VERSION}') or '0'
local start = '-'
if ARGV[1] ~= '0-0' then start = '(' .. ARGV[1] end
local entries = redis.call('XRANGE', '{CHANGES}', start, '+', 'COUNT', ARGV[2])
local out, seen = {{}}, {{}}
for i = #entries, 1, -1 do
  local flat, f = entries[i][2], {{}}
  for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
  local kind, repo, name = f['kind'] or '', f['repo'] or '', f['name'] or ''
  local id = kind .. '\\0' .. repo .. '\\0' .. name
  local latest, value = 0, false
  if not seen[id] then
    seen[id], latest = true, 1
    if kind == 'repo' then value = redis.call('HGET', '{REPOS}', repo)
    elseif kind == 'template' then value = redis.call('HGET', '{TEMPLATES}' .. repo, name)
    elseif kind == 'blueprint' then
      if redis.call('HEXISTS', '{BLUEPRINTS}' .. repo, name) == 1 then
        value = redis.call('HGET', '{BPSTATUS}' .. repo, name) or ''
      end
    elseif kind == 'service' then value = redis.call('HGETALL', '{SERVICE}' .. repo .. ':' .. name)
    end
  end
  out[i] = {{entries[i][1], f['v'] or '0', kind, repo, name, latest, value}}
end
return {{version, out}}
"""

# Everything, at one version: {version, last feed id, {repo, meta, templates, blueprint names, statuses,
# {key, service hash}...}...}
_LOAD = f"""
local version = redis.call('GET', '{VERSION}') or '0'
local last = redis.call('XREVRANGE', '{CHANGES}', '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
local repos, out = redis.call('HGETALL', '{REPOS}'), {{}}
for i = 1, #repos, 2 do
  local name, services = repos[i], {{}}
  for _, key in ipairs(redis.call('SMEMBERS', '{SERVICES}' .. name)) do
    services[#services + 1] = {{key, redis.call('HGETALL', '{SERVICE}' .. name .. ':' .. key)}}
  end
  out[#out + 1] = {{name, repos[i + 1], redis.call('HGETALL', '{TEMPLATES}' .. name),
                   redis.call('HKEYS', '{BLUEPRINTS}' .. name), redis.call('HGETALL', '{BPSTATUS}' .. name),
                   services}}
end
return {{version, last_id, out}}
"""

# ARGV: cap, source, what to record for it, the repositories (JSON). Imports each repository that Redis does
# not have, once per source: {0} when the source was imported already, else {1, {imported}, {skipped}}.
_IMPORT = _PRELUDE + f"""
if redis.call('HEXISTS', '{IMPORTED}', ARGV[2]) == 1 then return {{0}} end
local imported, skipped = {{}}, {{}}
for _, repo in ipairs(cjson.decode(ARGV[4])) do
  local name = repo['name']
  if redis.call('HSETNX', '{REPOS}', name, repo['meta']) == 0 then
    skipped[#skipped + 1] = name
  else
    imported[#imported + 1] = name
    for template, files in pairs(repo['templates']) do redis.call('HSET', '{TEMPLATES}' .. name, template, files) end
    for blueprint, content in pairs(repo['blueprints']) do
      redis.call('HSET', '{BLUEPRINTS}' .. name, blueprint, content)
    end
    for blueprint, status in pairs(repo['statuses']) do redis.call('HSET', '{BPSTATUS}' .. name, blueprint, status) end
    for _, service in ipairs(repo['services']) do
      local h = '{SERVICE}' .. name .. ':' .. service['key']
      redis.call('SADD', '{SERVICES}' .. name, service['key'])
      redis.call('HSET', h, 'record', service['record'], 'created', service['created'], 'updated', service['updated'])
      for action, state in pairs(service['states']) do redis.call('HSET', h, 'state:' .. action, state) end
    end
  end
end
redis.call('HSET', '{IMPORTED}', ARGV[2], ARGV[3])
if #imported > 0 then change('catalog', '', '') end
return {{1, imported, skipped}}
"""


def _flat(items: Any) -> dict[str, Any]:
    items = items or []
    return dict(zip(items[::2], items[1::2]))


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _service(repo: str, key: str, flat: Any) -> Optional[ServiceRecord]:
    """A ServiceRecord from the hash of ``ckpt.ays.service:<repo>:<key>``; None when it is gone or torn."""
    fields = _flat(flat)
    try:
        data = json.loads(fields["record"])
        record = ServiceRecord(repo, data["role"], data["instance"], data["template"], dict(data.get("args") or {}),
                               {}, _float(fields.get("created")), _float(fields.get("updated")),
                               data.get("blueprint"))
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    if record.key != key:
        return None
    record.states = {name[6:]: value for name, value in fields.items() if name.startswith("state:")}
    return record


def _services(items: list[tuple[str, str, Any]]) -> list[Optional[ServiceRecord]]:
    return [_service(repo, key, flat) for repo, key, flat in items]


def _decoded_services(items: list[tuple[str, str, Any]]) -> Deferred[list[Optional[ServiceRecord]]]:
    """The ServiceRecords of ``(repo, key, hash)``; decoded in a thread when they are big."""
    size = sum(len(value) for _, _, flat in items for value in (flat or ()) if isinstance(value, str))
    if size <= DECODE_INLINE:
        return defer.succeed(_services(items))
    return threads.deferToThread(_services, items)


def _status(value: Any) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    try:
        status = json.loads(value) if value else None
    except ValueError:
        status = None
    return status if isinstance(status, dict) else dict(NEW_STATUS)


def _meta(value: Any) -> Optional[RepoMeta]:
    if value is None:
        return None
    try:
        data = json.loads(value)
        return RepoMeta(data.get("created"), data.get("incarnation"))
    except (ValueError, AttributeError):
        return RepoMeta(None, None)


def _number(value: Optional[float]) -> str:
    return repr(float(value or 0.0))


def _record_json(record: ServiceRecord) -> str:
    return json.dumps({"role": record.role, "instance": record.instance, "template": record.template,
                       "args": record.args, "blueprint": record.blueprint}, ensure_ascii=False, default=str)


class RedisCatalogStore(CatalogStore):
    """The catalog in Redis, through ``bus``; ``actions_dir`` is where this process keeps actions files.

    ``import_from``: a repos directory to import on the first start (once per host and directory).
    """

    kind = "redis"
    shared = True

    def __init__(self, bus: RedisBus, actions_dir: Path, clock: IReactorTime, import_from: Optional[Path] = None,
                 changes_maxlen: int = CHANGES_MAXLEN) -> None:
        self.bus = bus
        self.actions_dir = Path(actions_dir)
        self.clock = clock
        self.import_from = Path(import_from) if import_from is not None else None
        self.cap = str(changes_maxlen)
        self._reader: Any = None
        # parsed templates: (repo, name) -> (the files as stored, Template or why it is broken)
        self._parsed: dict[tuple[str, str], tuple[str, Any]] = {}
        # states to write in the next turn: (repo, key) -> (action -> state, updated, who waits)
        self._batch: dict[tuple[str, str], tuple[dict[str, str], float, list[Deferred[Optional[int]]]]] = {}
        self._batch_call: Any = None
        self._writing: set[Deferred[Any]] = set()
        self._loads = 0

    def describe(self) -> str:
        return f"Redis at {self.bus.settings.redacted_url()}"

    def start(self) -> None:
        self._reader = self.bus.connect()  # the feed's blocking read must not hold up other commands

    @inlineCallbacks
    def stop(self) -> Generator[Deferred[Any], Any, None]:
        yield self.flush()
        reader, self._reader = self._reader, None
        if reader is not None:
            yield reader.disconnect()

    def _connected(self) -> Deferred[None]:
        """Fires once the bus has its connection: a start waits for it rather than fail at once."""
        if not self.bus.running:
            return defer.fail(BusUnavailable(f"the bus to {self.describe()} is not running"))
        if self.bus.reachable():
            return defer.succeed(None)
        return self.bus.when_connected()

    def _run(self, script: Script, *args: Any) -> Deferred[Any]:
        return script(self.bus, self.cap, *args)

    # -- loading -------------------------------------------------------------------
    @inlineCallbacks
    def load(self) -> Generator[Deferred[Any], Any, Loaded]:
        if self._loads == 0:
            yield self._connected()
            if self.import_from is not None:
                yield self._import()
        self._loads += 1
        version, last_id, repos = yield _LOAD_SCRIPT(self.bus)
        raw = []
        for name, meta, templates, blueprints, statuses, services in repos:
            raw.append((name, _meta(meta), _flat(templates), blueprints or [], _flat(statuses), services or []))
        templates = {(name, template): files for name, _, tpls, _, _, _ in raw for template, files in tpls.items()}
        self._parsed = {ident: parsed for ident, parsed in self._parsed.items() if ident in templates}
        parsed = yield self._parse(templates, prune=self._loads == 1)
        records = yield _decoded_services([(name, key, flat) for name, _, _, _, _, services in raw
                                           for key, flat in services])
        loaded: dict[str, RepoSnapshot] = {}
        for name, meta, tpls, blueprints, statuses, _ in raw:
            snapshot = RepoSnapshot(name, meta.created if meta else None,
                                    incarnation=meta.incarnation if meta else None)
            for template in tpls:
                self._place(snapshot, template, parsed[(name, template)])
            snapshot.blueprints = {bp: _status(statuses.get(bp, "")) or dict(NEW_STATUS) for bp in blueprints}
            loaded[name] = snapshot
        for record in records:
            if record is not None:
                loaded[record.repo].services[record.key] = record
        return Loaded(Position(last_id, int(version)), loaded)

    @staticmethod
    def _place(snapshot: RepoSnapshot, name: str, parsed: Any) -> None:
        if isinstance(parsed, Template):
            snapshot.templates[name] = parsed
        else:
            snapshot.broken[name] = parsed

    @inlineCallbacks
    def _parse(self, templates: dict[tuple[str, str], str],
               prune: bool = False) -> Generator[Deferred[Any], Any, dict[tuple[str, str], Template | str]]:
        """Fires with (repo, name) -> Template or why not, parsing in a thread what was not parsed before."""
        result, todo = {}, {}
        for ident, files in templates.items():
            cached = self._parsed.get(ident)
            if cached is not None and cached[0] == files:
                result[ident] = cached[1]
            else:
                todo[ident] = files
        if todo or prune:
            done = yield threads.deferToThread(self._parse_and_write, todo)
            for ident, parsed in done.items():
                self._parsed[ident] = (todo[ident], parsed)
                result[ident] = parsed
            if prune:
                keep = {t.actions_file.name for t in result.values() if isinstance(t, Template) and t.actions_file}
                yield threads.deferToThread(self._prune, keep)
        return result

    def _parse_and_write(self, todo: dict[tuple[str, str], str]) -> dict[tuple[str, str], Template | str]:
        done: dict[tuple[str, str], Template | str] = {}
        for (repo, name), raw in todo.items():
            try:
                files = json.loads(raw)
                check_template_files(files)
                template = load_template(repo, name, files)
                template.actions_file = self._actions_file(template, files.get("actions.py", ""))
                done[(repo, name)] = template
            except Invalid as exc:
                done[(repo, name)] = str(exc)
            except ValueError:
                done[(repo, name)] = "its files in Redis are not JSON"
        return done

    def _actions_file(self, template: Template, source: str) -> Path:
        path = self.actions_dir / f"{template.digest}.py"
        if not path.is_file():
            write_atomically(path, source.encode("utf-8"))
        return path

    def _prune(self, keep: set[str]) -> None:
        if not self.actions_dir.is_dir():
            return
        for entry in self.actions_dir.iterdir():
            if entry.suffix == ".py" and entry.name not in keep:
                try:
                    entry.unlink()
                except OSError:
                    pass

    # -- following ---------------------------------------------------------------------
    @inlineCallbacks
    def changes(self, after: Position, limit: int) -> Generator[Deferred[Any], Any, Changes]:
        version, entries = yield _CHANGES_SCRIPT(self.bus, after.id, str(limit))
        templates = {(repo, name): value for _, _, kind, repo, name, latest, value in entries
                     if kind == "template" and latest and value is not None}
        parsed = (yield self._parse(templates)) if templates else {}
        named = [(repo, name, value) for _, _, kind, repo, name, latest, value in entries
                 if kind == "service" and latest]
        records = iter((yield _decoded_services(named)) if named else [])
        out = []
        for entry_id, v, kind, repo, name, latest, value in entries:
            change = Change(entry_id, int(v), kind, repo, name, latest=bool(latest))
            if latest:
                if kind == "repo":
                    change.value = _meta(value)
                elif kind == "template":
                    change.value = parsed.get((repo, name)) if value is not None else None
                elif kind == "blueprint":
                    change.value = _status(value)
                elif kind == "service":
                    change.value = next(records)
            out.append(change)
        return Changes(int(version), out)

    def wait_for_change(self, after: Position) -> Deferred[None]:
        if self._reader is None:
            return defer.fail(txredisapi.ConnectionError("the catalog store is stopped"))
        waited: Deferred[None] = self._reader.handler.execute_command(
            "XREAD", "BLOCK", str(FEED_BLOCK_MS), "COUNT", "1", "STREAMS", CHANGES, after.id,
            apply_timeout=False).addCallback(lambda _: None)
        return waited

    # -- repositories ------------------------------------------------------------------------
    @inlineCallbacks
    def create_repo(self, repo: str, created: float) -> Generator[Deferred[Any], Any, RepoMeta]:
        meta = RepoMeta(created, uuid.uuid4().hex)
        version = yield self._run(_CREATE_REPO_SCRIPT, repo,
                                  json.dumps({"created": created, "incarnation": meta.incarnation}))
        if not version:
            raise Conflict(f"repository {repo!r} already exists")
        return meta

    @inlineCallbacks
    def delete_repo(self, repo: str) -> Generator[Deferred[Any], Any, object]:
        version = yield self._run(_DELETE_REPO_SCRIPT, repo)
        if not version:
            raise NotFound(f"no repository {repo!r}")
        return version

    # -- templates ---------------------------------------------------------------------------
    @inlineCallbacks
    def put_template(self, repo: str, name: str,
                     files: dict[str, Any]) -> Generator[Deferred[Any], Any, tuple[Template, bool]]:
        def check() -> tuple[str, Any]:
            check_template_files(files)
            raw = json.dumps(files, ensure_ascii=False, sort_keys=True)
            return raw, self._parse_and_write({(repo, name): raw})[(repo, name)]

        raw, template = yield threads.deferToThread(check)
        if isinstance(template, str):
            raise Invalid(template)
        version, created = yield self._run(_PUT_TEMPLATE_SCRIPT, repo, name, raw)
        if not version:
            raise NotFound(f"no repository {repo!r}")
        self._parsed[(repo, name)] = (raw, template)
        return template, bool(created)

    @inlineCallbacks
    def read_template_files(self, repo: str,
                            name: str) -> Generator[Deferred[Optional[str]], Optional[str], dict[str, str]]:
        raw = yield self.bus.execute("HGET", TEMPLATES + repo, name)
        if raw is None:
            raise NotFound(f"no template {name!r} in repository {repo!r}")
        files: dict[str, str] = json.loads(raw)  # as check_template_files passed them
        return files

    # -- blueprints ----------------------------------------------------------------------------
    @inlineCallbacks
    def read_blueprint(self, repo: str, name: str) -> Generator[Deferred[Optional[str]], Optional[str], str]:
        content = yield self.bus.execute("HGET", BLUEPRINTS + repo, blueprint_name(name))
        if content is None:
            raise NotFound(f"no blueprint {blueprint_name(name)!r} in repository {repo!r}")
        return content

    @inlineCallbacks
    def put_blueprint(self, repo: str, name: str, content: str,
                      create: bool) -> Generator[Deferred[Any], Any, object]:
        version = yield self._run(_PUT_BLUEPRINT_SCRIPT, repo, name, content, "1" if create else "0",
                                  json.dumps(NEW_STATUS))
        if version == 0:
            raise NotFound(f"no repository {repo!r}")
        if version == -1:
            raise Conflict(f"blueprint {name!r} already exists in repository {repo!r}; PUT it to change it")
        if version == -2:
            raise NotFound(f"no blueprint {name!r} in repository {repo!r}")
        return version

    @inlineCallbacks
    def delete_blueprint(self, repo: str, name: str) -> Generator[Deferred[Any], Any, object]:
        version = yield self._run(_DELETE_BLUEPRINT_SCRIPT, repo, name)
        if version == 0:
            raise NotFound(f"no repository {repo!r}")
        if version == -2:
            raise NotFound(f"no blueprint {name!r} in repository {repo!r}")
        return version

    def set_blueprint_status(self, repo: str, name: str, status: dict[str, Any]) -> Deferred[object]:
        return self._run(_SET_BLUEPRINT_STATUS_SCRIPT, repo, name, json.dumps(status, default=str))

    # -- services -------------------------------------------------------------------------------
    @inlineCallbacks
    def put_services(self, repo: str, records: list[ServiceRecord]
                     ) -> Generator[Deferred[Any], Any, tuple[list[ServiceRecord], Optional[int]]]:
        args: list[Any] = [repo]
        for record in records:
            args += [record.key, _record_json(record), _number(record.created), _number(record.updated),
                     str(len(record.states))]
            for action, state in record.states.items():
                args += [action, state]
        reply = yield self._run(_PUT_SERVICES_SCRIPT, *args)
        if not reply[0] and records:
            raise NotFound(f"no repository {repo!r}")
        stored = [_service(repo, record.key, flat) for record, flat in zip(records, reply[1:])]
        return [record for record in stored if record is not None], int(reply[0])

    @inlineCallbacks
    def delete_service(self, repo: str, key: str) -> Generator[Deferred[Any], Any, object]:
        version = yield self._run(_DELETE_SERVICE_SCRIPT, repo, key)
        if not version:
            raise NotFound(f"no service {key!r} in repository {repo!r}")
        return version

    def set_states(self, repo: str, key: str, states: dict[str, str], updated: float) -> Deferred[Optional[int]]:
        # the states set in one reactor turn share one script, and one change per service
        d: Deferred[Optional[int]] = Deferred()
        pending = self._batch.get((repo, key))
        if pending is None:
            self._batch[(repo, key)] = (dict(states), updated, [d])
        else:
            pending[0].update(states)
            self._batch[(repo, key)] = (pending[0], max(pending[1], updated), pending[2] + [d])
        if self._batch_call is None:
            self._batch_call = self.bus.reactor.callLater(0, self._write_states)
        return d

    def _write_states(self) -> Deferred[None]:
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        self._batch_call = None
        batch, self._batch = list(self._batch.items()), {}
        if not batch:
            return defer.succeed(None)
        args: list[Any] = []
        for (repo, key), (states, updated, _) in batch:
            args += [repo, key, _number(updated), str(len(states))]
            for action, state in states.items():
                args += [action, state]
        d = self._run(_SET_STATES_SCRIPT, *args)
        self._writing.add(d)

        def written(versions: list[Any]) -> None:
            self._writing.discard(d)
            for (_, (_, _, waiters)), version in zip(batch, versions):
                for waiter in waiters:
                    waiter.callback(int(version) or None)

        def failed(failure: Any) -> None:
            self._writing.discard(d)
            for _, (_, _, waiters) in batch:
                for waiter in waiters:
                    waiter.errback(failure)

        d.addCallbacks(written, failed)
        return d

    def flush(self) -> Deferred[None]:
        self._write_states()
        return defer.DeferredList(list(self._writing), consumeErrors=True).addCallback(lambda _: None)

    # -- the first start with Redis over a repos directory ---------------------------------------
    def source(self) -> str:
        """What names the directory to import: this host and its path."""
        return f"{socket.gethostname()}:{self.import_from.resolve() if self.import_from else ''}"

    @inlineCallbacks
    def _import(self) -> Generator[Deferred[Any], Any, None]:
        source = self.source()
        if (yield self.bus.execute("HEXISTS", IMPORTED, source)) == 1:
            return  # imported before: the directory is not read again
        path = self.import_from
        assert path is not None, "load() imports only when there is a directory to import from"
        data = yield threads.deferToThread(self._read_directory, path)
        if not data:
            return
        marker = json.dumps({"at": self.clock.seconds(), "repos": [repo["name"] for repo in data]})
        reply = yield self._run(_IMPORT_SCRIPT, source, marker, json.dumps(data, ensure_ascii=False))
        if not reply[0]:
            log.info("AYS catalog: the repositories under {path} were imported into Redis by another process; "
                     "that directory is no longer read", path=str(path))
            return
        imported, skipped = reply[1] or [], reply[2] or []
        log.info("AYS catalog: imported {count} repositories from {path} into Redis; that directory is no longer "
                 "read", count=len(imported), path=str(path), repos=imported)
        for name in skipped:
            log.warn("AYS catalog: repository {repo} under {path} was not imported: Redis holds a repository of "
                     "that name already; its files stay where they are", repo=name, path=str(path))

    @staticmethod
    def _read_directory(path: Path) -> list[dict[str, Any]]:
        files = RepoStore(path)
        data = []
        for name in files.list_repos():
            try:
                repo = files.read_repo(name)
            except (OSError, NotFound, Invalid) as exc:
                log.warn("AYS catalog: repository {repo} under {path} cannot be read for the import: {error}",
                         repo=name, path=str(path), error=exc)
                continue
            data.append({
                "name": name,
                "meta": json.dumps({"created": repo["created"], "incarnation": uuid.uuid4().hex}),
                "templates": {t: json.dumps(f, ensure_ascii=False, sort_keys=True)
                              for t, f in repo["templates"].items()},
                "blueprints": repo["blueprints"],
                "statuses": {b: json.dumps(s, default=str) for b, s in repo["statuses"].items()},
                "services": [{"key": s.key, "record": _record_json(s), "created": _number(s.created),
                              "updated": _number(s.updated), "states": {str(a): str(st) for a, st in s.states.items()}}
                             for s in repo["services"]],
            })
        return data


_CREATE_REPO_SCRIPT = Script(_CREATE_REPO)
_DELETE_REPO_SCRIPT = Script(_DELETE_REPO)
_PUT_TEMPLATE_SCRIPT = Script(_PUT_TEMPLATE)
_PUT_BLUEPRINT_SCRIPT = Script(_PUT_BLUEPRINT)
_DELETE_BLUEPRINT_SCRIPT = Script(_DELETE_BLUEPRINT)
_SET_BLUEPRINT_STATUS_SCRIPT = Script(_SET_BLUEPRINT_STATUS)
_PUT_SERVICES_SCRIPT = Script(_PUT_SERVICES)
_DELETE_SERVICE_SCRIPT = Script(_DELETE_SERVICE)
_SET_STATES_SCRIPT = Script(_SET_STATES)
_CHANGES_SCRIPT = Script(_CHANGES)
_LOAD_SCRIPT = Script(_LOAD)
_IMPORT_SCRIPT = Script(_IMPORT)
