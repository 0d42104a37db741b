"""The run history on Redis, shared by every cockpit process on it (see :mod:`cockpit.runs`).

Keys (a run id sorts by creation time, see :func:`cockpit.runs.new_run_id`):

- ``ckpt.run.<id>``: hash, the run: ``run`` (its JSON, as ``GET /api/runs/{id}`` shows it) and
  ``k`` (what its index entries and mark are, msgpack, for pruning).
- ``ckpt.runs``: sorted set of every recorded run id, all scored 0: ordered by id, ranged lexically.
- ``ckpt.runs.repo.<repo>``, ``ckpt.runs.service.<role!instance>`` (``ckpt.runs.service.`` for
  the robot's own runs), ``ckpt.runs.action.<action>``, ``ckpt.runs.state.<state>``: the same,
  for the recorded runs with that value.
- ``ckpt.runs.done.<event guid>``: hash, the completion marks of one event: the JSON of
  ``[repo, service, action]`` -> the id of the run recorded for it.
- ``ckpt.runs.live``: sorted set, the runs shown running, scored by when that stops unless renewed.
  Their records are ``ckpt.run.<id>`` too, in no index.

One Lua script writes a group of records: for each, it checks the id and the mark, then
writes the run, the mark and the index entries, or refuses it; so a tuple is completed
once, whichever process records it. A record past ``keep_runs`` drops the oldest (at most
two for each one written); the timer prunes by age, in steps of ``PRUNE_STEP`` runs. A
run, its index entries and its mark go together.

A page is read from the smallest index among its filters (ZCARD of each), newest first from
``before``, its other filters looked up with ZSCORE, ``SCAN_STEP`` ids per script call, so
that Redis is never held long; the calls go on until the page is full or the index ends.
Worst case: a page examines every id of that smallest index (at most ``keep_runs``) in
keep_runs / SCAN_STEP calls. ``event_guid`` reads the event's marks instead (a few ids), no
filter reads all of ``ckpt.runs``, and each page also reads every live run (bounded by the
runs in progress in all processes).

A run in progress is shown once it has gone on for ``LIVE_AFTER`` seconds (most runs are
over sooner, and a record written for each would double what a busy robot writes), until
it is recorded; its process renews it every
``LIVE_RENEW`` seconds, and a run of a process that died stops showing ``LIVE_TTL`` after
its last renewal. Deadlines are on the writer's clock: processes on several machines need
clocks that agree to within a few seconds.
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from typing import Any, Generator, List, Optional

import txredisapi
from twisted.application.internet import TimerService
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cockpit.backends.redis.bus import RedisBus
from cockpit.bus import BusUnavailable
from cockpit.runs import Run, RunHistory, check_filters, id_bound

log = Logger()

RUN_PREFIX = "ckpt.run."
RUNS_KEY = "ckpt.runs"
INDEX_PREFIXES = {"repo": "ckpt.runs.repo.", "service": "ckpt.runs.service.", "action": "ckpt.runs.action.",
                  "state": "ckpt.runs.state."}
DONE_PREFIX = "ckpt.runs.done."
LIVE_KEY = "ckpt.runs.live"

SCAN_STEP = 1000  # ids one script call examines for a filtered page
PRUNE_STEP = 500  # runs one script call prunes
LIVE_AFTER = 0.5  # seconds a run goes on before it is shown as running to every process
LIVE_RENEW = 10.0  # seconds
LIVE_TTL = 3 * LIVE_RENEW
BATCH_RUNS = 256  # records one script call writes...
BATCH_BYTES = 1 << 20  # ...and about how many bytes of them
PARSE_IN_THREAD = 1 << 20  # bytes of runs read back past which they are parsed off the reactor thread
RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # seconds between tries to write while Redis is away

_PRELUDE = """
local RUN, RUNS, DONE, LIVE = '%(run)s', '%(runs)s', '%(done)s', '%(live)s'
local FIELDS = {'repo', 'service', 'action', 'state'}
local INDEX = {repo = '%(repo)s', service = '%(service)s', action = '%(action)s', state = '%(state)s'}

local function drop(id)
  local key = RUN .. id
  local packed = redis.call('HGET', key, 'k')
  if packed then
    local k = cmsgpack.unpack(packed)  -- repo, service, action, state, guid, mark
    for i, name in ipairs(FIELDS) do redis.call('ZREM', INDEX[name] .. k[i], id) end
    if k[5] ~= '' and redis.call('HGET', DONE .. k[5], k[6]) == id then
      redis.call('HDEL', DONE .. k[5], k[6])
    end
    redis.call('DEL', key)
  end
  redis.call('ZREM', RUNS, id)
end

-- the index keys of the filters given as name, value pairs from ARGV[first]
local function wanted(first)
  local want, keys = {}, {}
  for i = first, #ARGV, 2 do
    want[ARGV[i]] = ARGV[i + 1]
    if INDEX[ARGV[i]] then table.insert(keys, INDEX[ARGV[i]] .. ARGV[i + 1]) end
  end
  return want, keys
end

-- the smallest of the keys, to scan, and the others, to look ids up in
local function smallest(keys)
  if #keys == 0 then return RUNS, {} end
  local best, size = 1, redis.call('ZCARD', keys[1])
  for j = 2, #keys do
    local n = redis.call('ZCARD', keys[j])
    if n < size then best, size = j, n end
  end
  local others = {}
  for j, key in ipairs(keys) do
    if j ~= best then table.insert(others, key) end
  end
  return keys[best], others
end

local function indexed(id, others)
  for _, key in ipairs(others) do
    if not redis.call('ZSCORE', key, id) then return false end
  end
  return true
end

-- newest first below the cursor: (ids that match, the cursor to go on from or '' at the end)
local function scan(key, others, cursor, limit, budget, count_only)
  local found, start, examined = {}, cursor == '' and '+' or '(' .. cursor, 0
  local matched = 0
  while matched < limit and examined < budget do
    local step = #others == 0 and math.min(limit - matched, budget - examined) or math.min(budget - examined, 256)
    local ids = redis.call('ZREVRANGEBYLEX', key, start, '-', 'LIMIT', 0, step)
    for _, id in ipairs(ids) do
      examined = examined + 1
      start = '(' .. id
      if indexed(id, others) then
        matched = matched + 1
        if not count_only then table.insert(found, id) end
        if matched == limit then break end
      end
    end
    if #ids < step then return found, matched, '' end
  end
  if matched == limit then return found, matched, '' end
  return found, matched, string.sub(start, 2)
end
""" % {"run": RUN_PREFIX, "runs": RUNS_KEY, "done": DONE_PREFIX, "live": LIVE_KEY, **INDEX_PREFIXES}

# ARGV: keep_runs, how many to drop at most, then 10 values an entry: kind (R: record, L: show
# running, F: stop showing), id, event guid ("" for none), mark, repo, service, action, state,
# run JSON, deadline (L). Replies 1 or 0 an entry: R recorded or refused, L shown or not.
_WRITE = _PRELUDE + """
local keep, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 10 do
  local kind, id, guid, mark = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local values = {ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]}
  local key = RUN .. id
  local done = 0
  if kind == 'R' then
    local live = redis.call('ZREM', LIVE, id) == 1
    local fresh = live or redis.call('EXISTS', key) == 0
    if fresh and guid ~= '' then fresh = redis.call('HSETNX', DONE .. guid, mark, id) == 1 end
    if fresh then
      redis.call('HSET', key, 'k', cmsgpack.pack({values[1], values[2], values[3], values[4], guid, mark}),
                 'run', ARGV[i + 8])
      redis.call('ZADD', RUNS, 0, id)
      for j, name in ipairs(FIELDS) do redis.call('ZADD', INDEX[name] .. values[j], 0, id) end
      done = 1
    elseif live then
      redis.call('DEL', key)  -- the refused run's own record, shown while it ran
    end
  elseif kind == 'L' then
    if redis.call('EXISTS', key) == 0 or redis.call('ZSCORE', LIVE, id) then
      redis.call('HSET', key, 'k', cmsgpack.pack({values[1], values[2], values[3], values[4], guid, mark}),
                 'run', ARGV[i + 8])
      redis.call('ZADD', LIVE, ARGV[i + 9], id)
      done = 1
    end
  elseif redis.call('ZREM', LIVE, id) == 1 then
    redis.call('DEL', key)
    done = 1
  end
  table.insert(out, done)
end
local over = redis.call('ZCARD', RUNS) - keep
if over > 0 and most > 0 then
  for _, id in ipairs(redis.call('ZRANGE', RUNS, 0, math.min(over, most) - 1)) do drop(id) end
end
return out
"""

# ARGV: id bound (runs below it are too old), keep_runs, step, now. Replies {pruned, more to do}.
_PRUNE = _PRELUDE + """
local step = tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYLEX', RUNS, '-', '(' .. ARGV[1], 'LIMIT', 0, step)
for _, id in ipairs(ids) do drop(id) end
local gone = #ids
if gone < step then
  local over = redis.call('ZCARD', RUNS) - tonumber(ARGV[2])
  if over > 0 then
    ids = redis.call('ZRANGE', RUNS, 0, math.min(over, step - gone) - 1)
    for _, id in ipairs(ids) do drop(id) end
    gone = gone + #ids
  end
end
local lapsed = redis.call('ZRANGEBYSCORE', LIVE, '-inf', '(' .. ARGV[4], 'LIMIT', 0, step)
for _, id in ipairs(lapsed) do
  redis.call('DEL', RUN .. id)
  redis.call('ZREM', LIVE, id)
end
return {gone, (gone == step or #lapsed == step) and 1 or 0}
"""

# ARGV: new deadline, now, then the ids this process shows running. Renews those still shown and
# forgets a few that lapsed (their process is gone).
_RENEW = _PRELUDE + """
for i = 3, #ARGV do redis.call('ZADD', LIVE, 'XX', ARGV[1], ARGV[i]) end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LIVE, '-inf', '(' .. ARGV[2], 'LIMIT', 0, 100)) do
  redis.call('DEL', RUN .. id)
  redis.call('ZREM', LIVE, id)
end
return 0
"""

# ARGV: cursor ("" from the newest), limit, budget, now, "1" to read the live runs too, then the
# filters as name, value pairs. Replies {cursor to go on from or "", recorded ids, live ids}; the
# ids of an event's marks come unordered and all at once.
_LIST = _PRELUDE + """
local cursor, limit, budget, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local want, keys = wanted(6)
local found, next_cursor = {}, ''
if want.event_guid then
  for _, id in ipairs(redis.call('HVALS', DONE .. want.event_guid)) do
    if indexed(id, keys) then table.insert(found, id) end
  end
else
  local key, others = smallest(keys)
  local matched
  found, matched, next_cursor = scan(key, others, cursor, limit, budget, false)
end
local live = {}
if ARGV[5] == '1' then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LIVE, now, '+inf')) do
    local packed = redis.call('HGET', RUN .. id, 'k')
    if packed then
      local k = cmsgpack.unpack(packed)
      local values = {repo = k[1], service = k[2], action = k[3], state = k[4], event_guid = k[5]}
      local ok = true
      for name, value in pairs(want) do
        if values[name] ~= value then ok = false break end
      end
      if ok then table.insert(live, id) end
    end
  end
end
return {next_cursor, found, live}
"""

# ARGV: cursor, budget, then the filters. Replies {count, cursor to go on from or ""}.
_COUNT = _PRELUDE + """
local want, keys = wanted(3)
if want.event_guid then
  local n = 0
  for _, id in ipairs(redis.call('HVALS', DONE .. want.event_guid)) do
    if indexed(id, keys) then n = n + 1 end
  end
  return {n, ''}
end
if #keys <= 1 then return {redis.call('ZCARD', keys[1] or RUNS), ''} end
local key, others = smallest(keys)
local _, n, cursor = scan(key, others, ARGV[1], math.huge, tonumber(ARGV[2]), true)
return {n, cursor}
"""

# ARGV: id, now. The run's JSON, or nil (none, or shown running by a process that is gone).
_GET = _PRELUDE + """
local run = redis.call('HGET', RUN .. ARGV[1], 'run')
if not run then return false end
local until_ = redis.call('ZSCORE', LIVE, ARGV[1])
if until_ and tonumber(until_) < tonumber(ARGV[2]) then return false end
return run
"""


class _Script:
    """A Lua script run by its SHA1, loaded (EVAL) where Redis does not have it yet."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, bus: RedisBus, *args: Any) -> Deferred[Any]:
        d = bus.execute("EVALSHA", self.sha, "0", *args)
        d.addErrback(self._load, bus, args)
        return d

    def _load(self, failure: Failure, bus: RedisBus, args: tuple[Any, ...]) -> Any:
        failure.trap(txredisapi.ResponseError)
        if "NOSCRIPT" not in failure.getErrorMessage():
            return failure
        return bus.execute("EVAL", self.source, "0", *args)


_write, _prune, _renew, _list, _count, _get = map(_Script, (_WRITE, _PRUNE, _RENEW, _LIST, _COUNT, _GET))


def _bytes(text: str) -> bytes:
    # a chat command's repository name can be any text, lone surrogates included
    return text.encode("utf-8", "surrogatepass")


def _filter_args(filters: dict[str, Optional[str]]) -> list[bytes]:
    return [_bytes(part) for name, value in check_filters(filters).items() for part in (name, value)]


def _parse(texts: list[Optional[str]]) -> list[Run]:
    return [Run.from_dict(json.loads(text)) for text in texts if text]


class RedisRunHistory(RunHistory):
    """Every process's runs on one Redis (see the module docstring); it prunes them and renews its live ones."""

    scan_step = SCAN_STEP
    prune_step = PRUNE_STEP

    def __init__(self, bus: RedisBus, clock: IReactorTime, keep_days: float = 30.0, keep_runs: int = 100000,
                 prune_interval: float = 3600.0):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.bus = bus
        self.clock = clock
        self.keep_days = keep_days
        self.keep_runs = keep_runs
        # (kind, run, d): d fires True or False once written, or None (a marker; a show or unshow that failed)
        self._queue: deque[tuple[str, Optional[Run], Deferred[Any]]] = deque()
        self._writing = False
        self._retry: Any = None
        self._retry_delay = RETRY_FIRST
        self._prune_retry: Any = None
        self._live: dict[str, Run] = {}  # shown running by this process, not recorded yet
        self._to_show: dict[str, tuple[Any, Deferred[None]]] = {}  # started, to be shown if still going
        for interval, work in ((prune_interval, self._prune_logged), (LIVE_RENEW, self._renew_logged)):
            # TimerService is Twisted's own, unannotated
            timer = TimerService(interval, work)  # type: ignore[no-untyped-call]
            timer.clock = clock
            timer.setServiceParent(self)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        self._retry_delay = RETRY_FIRST
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        for call in (self._retry, self._prune_retry):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._prune_retry = None
        for call, shown in self._to_show.values():
            call.cancel()
            shown.callback(None)
        self._to_show.clear()
        yield super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        for run in self._live.values():  # never recorded: the pool stopped before they ended
            self._queue.append(("F", run, Deferred()))
        self._live.clear()
        while self._writing or self._queue:
            waiting: Deferred[None] = Deferred()
            self._queue.append(("", None, waiting))  # fires once everything before it is written
            self._kick()
            yield waiting

    # -- writing -----------------------------------------------------------
    def record(self, run: Run) -> Deferred[bool]:
        self._live.pop(run.id, None)
        waiting = self._to_show.pop(run.id, None)
        if waiting is not None:  # over before it was shown: only its record is written
            waiting[0].cancel()
            waiting[1].callback(None)
        return self._enqueue("R", run)

    def started(self, run: Run) -> Deferred[None]:
        """Show ``run`` as running, if it still is ``LIVE_AFTER`` seconds from now; fires once shown (or not)."""
        shown: Deferred[None] = Deferred()
        self._to_show[run.id] = (self.clock.callLater(LIVE_AFTER, self._show, run), shown)
        return shown

    def _show(self, run: Run) -> None:
        _, shown = self._to_show.pop(run.id)
        self._live[run.id] = run
        self._enqueue("L", run).addCallback(lambda _: None).chainDeferred(shown)

    def _enqueue(self, kind: str, run: Run) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.append((kind, run, d))
        self._kick()
        return d

    def _kick(self) -> None:
        """Write what is queued, unless a write is under way: what comes meanwhile goes into the next."""
        if self._writing or (self._retry is not None and self.running) or not self._queue:
            return
        self._retry = None
        batch: list[tuple[str, Optional[Run], Deferred[Any]]] = []
        args: list[str | bytes] = [str(self.keep_runs), "0"]
        size = 0
        deadline = repr(self.clock.seconds() + LIVE_TTL)
        while self._queue and len(batch) < BATCH_RUNS and size < BATCH_BYTES:
            entry = self._queue.popleft()
            kind, run, _ = entry
            batch.append(entry)
            if run is None:
                continue
            text = run.to_json() if kind != "F" else ""
            size += len(text)
            guid = run.event_guid or ""
            args += [kind, _bytes(run.id), _bytes(guid),
                     json.dumps(run.once_key) if guid else "",
                     _bytes(run.repo), _bytes(run.service or ""), _bytes(run.action), _bytes(run.state),
                     text, deadline]
        records = sum(1 for kind, _, _ in batch if kind == "R")
        args[1] = str(2 * records)  # drops keep pace with records, past keep_runs
        if len(args) == 2:  # only markers
            self._written([], batch)
            return
        self._writing = True
        _write(self.bus, *args).addCallbacks(self._written, self._write_failed, callbackArgs=(batch,),
                                             errbackArgs=(batch,))

    def _written(self, replies: list[Any], batch: list[tuple[str, Optional[Run], Deferred[Any]]]) -> None:
        self._writing = False
        self._retry_delay = RETRY_FIRST
        flags = iter(replies)
        for kind, _, d in batch:
            d.callback(bool(int(next(flags))) if kind else None)
        self._kick()

    def _write_failed(self, failure: Failure, batch: list[tuple[str, Optional[Run], Deferred[Any]]]) -> None:
        self._writing = False
        records = sum(1 for kind, _, _ in batch if kind == "R")
        if failure.check(BusUnavailable) and self.running:
            # Redis is away: try again, in order, rather than lose what completed
            self._queue.extendleft(reversed(batch))
            log.warn("run history: Redis is away ({error}); {count} writes wait for it",
                     error=failure.getErrorMessage(), count=len(self._queue))
            self._retry = self.clock.callLater(self._retry_delay, self._retried)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            return
        if failure.check(BusUnavailable):
            if records:
                log.warn("run history: Redis is away as the cockpit stops; {count} runs are not recorded "
                         "(their events are delivered again)", count=records)
        else:
            log.failure("run history: cannot write {count} runs", failure, count=records)
        for kind, _, d in batch:
            if kind == "R":
                d.errback(failure)
            else:
                d.callback(None)  # showing a run as running is not worth failing anything for
        self._kick()

    def _retried(self) -> None:
        self._retry = None
        self._kick()

    # -- reading -----------------------------------------------------------
    def completed(self, event_guid: str) -> Deferred[set[tuple[str, str, str]]]:
        return self.bus.execute("HKEYS", _bytes(DONE_PREFIX + event_guid)).addCallback(
            lambda fields: {tuple(json.loads(field)) for field in fields})

    def get(self, run_id: str) -> Deferred[Optional[Run]]:
        return _get(self.bus, _bytes(run_id), repr(self.clock.seconds())).addCallback(
            lambda text: Run.from_dict(json.loads(text)) if text else None)

    @inlineCallbacks
    def list(self, limit: int = 50, before: Optional[str] = None,
             **filters: Optional[str]) -> Generator[Deferred[Any], Any, List[Run]]:
        wanted = _filter_args(filters)
        if limit <= 0:
            return []
        now = repr(self.clock.seconds())
        recorded: list[str] = []
        live: list[str] = []
        cursor, first = before or "", True
        while True:
            cursor, found, shown = yield _list(self.bus, _bytes(cursor), str(limit - len(recorded)),
                                               str(self.scan_step), now, "1" if first else "0", *wanted)
            recorded += found
            if first:
                live, first = shown, False
            if not cursor or len(recorded) >= limit:
                break
        ids = sorted({i for i in recorded + live if not before or i < before}, reverse=True)[:limit]
        if not ids:
            return []
        texts = yield self.bus.transaction(*[("HGET", RUN_PREFIX + run_id, "run") for run_id in ids])
        if sum(len(text) for text in texts if text) > PARSE_IN_THREAD:
            runs: list[Run] = yield threads.deferToThread(_parse, texts)
        else:
            runs = _parse(texts)
        return runs

    @inlineCallbacks
    def count(self, **filters: Optional[str]) -> Generator[Deferred[Any], Any, int]:
        wanted = _filter_args(filters)
        total, cursor = 0, ""
        while True:
            n, cursor = yield _count(self.bus, _bytes(cursor), str(self.scan_step), *wanted)
            total += int(n)
            if not cursor:
                return total

    # -- pruning and renewing ---------------------------------------------------
    @inlineCallbacks
    def prune(self, now: Optional[float] = None) -> Generator[Deferred[Any], Any, int]:
        now = self.clock.seconds() if now is None else now
        bound = id_bound(now - self.keep_days * 86400)
        total = 0
        while True:
            gone, more = yield _prune(self.bus, bound, str(self.keep_runs), str(self.prune_step), repr(now))
            total += int(gone)
            if not int(more):
                return total

    def _prune_logged(self) -> Deferred[None]:
        self._prune_retry = None
        d: Deferred[Any] = self.prune()

        def pruned(count: int) -> None:
            if count:
                log.info("pruned {count} old runs", count=count)

        d.addCallback(pruned)
        d.addErrback(self._prune_failed)
        return d

    def _prune_failed(self, failure: Failure) -> None:
        if failure.check(BusUnavailable):
            # at start Redis is often not connected yet: soon, rather than a prune_interval later
            if self.running:
                self._prune_retry = self.clock.callLater(RETRY_MAX, self._prune_logged)
            return
        log.warn("pruning runs failed: {error}", error=failure.getErrorMessage())

    def _renew_logged(self) -> None:
        now = self.clock.seconds()
        d = _renew(self.bus, repr(now + LIVE_TTL), repr(now), *map(_bytes, self._live))
        d.addErrback(lambda f: None if f.check(BusUnavailable) else log.warn(
            "run history: cannot renew the runs shown running: {error}", error=f.getErrorMessage()))
