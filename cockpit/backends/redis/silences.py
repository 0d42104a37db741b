"""Silences in Redis, shared by every cockpit process on it.

Keys:

- ``ckpt.silences``: every silence (hash: id -> its JSON);
- ``ckpt.silences.ends``: the ids whose end nobody has claimed yet, by end (sorted set): ``active`` reads
  the ones past now, ``claim_ended`` takes the others;
- ``ckpt.silences.ended``: the claimed ones (and those expired before they started), by end (sorted set),
  so that each is removed 7 days after its end.

Claiming moves an id from the first set to the second in one Lua script, so each end is handed out once.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from cockpit.backends.redis.bus import RedisBus
from cockpit.backends.redis.script import Script
from cockpit.silences import (KEEP_EXPIRED, PRUNE_BATCH, NewSilence, Silences, SilenceStore, create,
                              expired_copy, newest_first, present, state)

SILENCES = "ckpt.silences"
ENDS = "ckpt.silences.ends"
ENDED = "ckpt.silences.ended"

_COMMON = f"""
local S, ENDS, ENDED = '{SILENCES}', '{ENDS}', '{ENDED}'
-- remove what ended before `cutoff`, at most {PRUNE_BATCH} from each set
local function prune(cutoff)
  for _, set in ipairs({{ENDS, ENDED}}) do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', set, '-inf', '(' .. cutoff, 'LIMIT', 0, {PRUNE_BATCH})) do
      redis.call('HDEL', S, id)
      redis.call('ZREM', ENDS, id)
      redis.call('ZREM', ENDED, id)
    end
  end
end
"""

# ARGV: the cutoff. Returns every silence's JSON.
_LIST = Script(_COMMON + """
prune(ARGV[1])
return redis.call('HVALS', S)
""")

# ARGV: now. Returns the JSON of each silence not ended at now (the caller drops the pending ones).
_ACTIVE = Script(_COMMON + """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ENDS, '(' .. ARGV[1], '+inf')) do
  local raw = redis.call('HGET', S, id)
  if raw then table.insert(out, raw) end
end
return out
""")

# ARGV: now, the cutoff. Moves each silence ended at now to the claimed set; returns their JSON.
_CLAIM = Script(_COMMON + """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ENDS, '-inf', ARGV[1])) do
  redis.call('ZADD', ENDED, redis.call('ZSCORE', ENDS, id), id)
  redis.call('ZREM', ENDS, id)
  local raw = redis.call('HGET', S, id)
  if raw then table.insert(out, raw) end
end
prune(ARGV[2])
return out
""")

# ARGV: id, the JSON read, the JSON ended, its end, "1" when it never started. Writes it unless the silence
# changed since it was read: nil when it is gone, 0 when it changed, 1 when written.
_EXPIRE = Script(_COMMON + """
local id = ARGV[1]
local raw = redis.call('HGET', S, id)
if not raw then return nil end
if raw ~= ARGV[2] then return 0 end
redis.call('HSET', S, id, ARGV[3])
if redis.call('ZSCORE', ENDS, id) and ARGV[5] ~= '1' then
  redis.call('ZADD', ENDS, ARGV[4], id)
else
  redis.call('ZREM', ENDS, id)
  redis.call('ZADD', ENDED, ARGV[4], id)
end
return 1
""")


def _loaded(replies: Any, now: float) -> Silences:
    # one parse for them all: ``active`` runs every second in every process
    silences: Silences = json.loads("[" + ",".join(replies or []) + "]")
    for silence in silences:
        silence["state"] = state(silence, now)
    return silences


class RedisSilenceStore(SilenceStore):
    retries = 5  # an expire that keeps meeting a concurrent change gives up after this many reads

    def __init__(self, bus: RedisBus, clock: IReactorTime):
        super().__init__(clock)
        self.bus = bus

    def add(self, new: NewSilence, now: float) -> Deferred[dict[str, Any]]:
        try:
            silence = create(new, now)
        except ValueError as exc:
            return defer.fail(exc)
        d = self.bus.transaction(("HSET", SILENCES, silence["id"], json.dumps(silence)),
                                 ("ZADD", ENDS, repr(silence["ends"]), silence["id"]))
        return d.addCallback(lambda _: present(silence, now))

    def list(self, now: float) -> Deferred[Silences]:
        d = _LIST(self.bus, repr(now - KEEP_EXPIRED))
        return d.addCallback(lambda replies: newest_first(_loaded(replies, now)))

    def active(self, now: float) -> Deferred[Silences]:
        d = _ACTIVE(self.bus, repr(now))
        return d.addCallback(lambda replies: [s for s in _loaded(replies, now) if s["starts"] <= now])

    def claim_ended(self, now: float) -> Deferred[Silences]:
        return _CLAIM(self.bus, repr(now), repr(now - KEEP_EXPIRED)).addCallback(_loaded, now)

    def expire(self, silence_id: str, now: float) -> Deferred[Optional[dict[str, Any]]]:
        return self._expire(silence_id, now, 0)

    def _expire(self, silence_id: str, now: float, attempt: int) -> Deferred[Optional[dict[str, Any]]]:
        """Read, end, write unless it changed in between (then read again)."""

        def write(raw: Optional[str]) -> Any:
            if raw is None:
                return None
            silence = json.loads(raw)
            ended, never_started = expired_copy(silence, now)
            if ended is silence:
                return present(silence, now)
            d = _EXPIRE(self.bus, silence_id, raw, json.dumps(ended), repr(ended["ends"]),
                        "1" if never_started else "0")
            return d.addCallback(written, ended)

        def written(reply: Any, ended: dict[str, Any]) -> Any:
            if reply is None:
                return None
            if int(reply) == 1:
                return present(ended, now)
            if attempt + 1 >= self.retries:
                raise RuntimeError(f"silence {silence_id} kept changing while it was expired")
            return self._expire(silence_id, now, attempt + 1)

        return self.bus.execute("HGET", SILENCES, silence_id).addCallback(write)
