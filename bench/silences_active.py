"""``RedisSilenceStore.active`` calls/s against reading every silence (HVALS) and filtering, in one run.

    python bench/silences_active.py [--calls 2000] [--active 100] [--ended 10000] [--rounds 3]

Every process asks ``active`` about once a second, and expired silences stay listed for 7 days: the
store reads only the silences that have not ended (``ckpt.silences.ends`` past now), so its cost
follows what is in force, not what is kept. The baseline is the plain way, one HVALS of
``ckpt.silences`` parsed and filtered in Python, over the same data, on the same bus; a bare PING
gives the round trip. Starts a redis-server of its own on a free port (loopback only) and stops it
at the end. Calls are made one after the other, as the notices make them.
Goal: with ``--ended`` expired silences beside ``--active`` in force, ``active`` is at least 10 times
the baseline's rate; with none ended, at least 0.8 of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.result import result  # noqa: E402

from twisted.internet import defer, task  # noqa: E402

from cockpit.backends.redis import RedisBackend, RedisBus  # noqa: E402
from cockpit.config import RedisSection  # noqa: E402
from cockpit.silences import NewSilence  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

GOAL_ENDED, GOAL_NONE = 10.0, 0.8
NOW = 1_800_000_000.0


@defer.inlineCallbacks
def rate(call, calls: int):
    started = time.perf_counter()
    for _ in range(calls):
        yield call()
    return calls / (time.perf_counter() - started)


@defer.inlineCallbacks
def add(store, count: int, duration: float, at: float):
    for i in range(0, count, 500):
        yield defer.gatherResults([store.add(NewSilence(matchers={"service": f"node!n{n}*", "team": "ops"},
                                                        duration=duration, comment="maintenance"), at)
                                   for n in range(i, min(count, i + 500))])


@defer.inlineCallbacks
def main(reactor, args):
    server = RedisServer().start()
    bus = RedisBus(RedisSection(url=server.url), reactor=reactor)
    bus.startService()
    try:
        yield bus.when_connected()
        store = RedisBackend(bus.settings, reactor, bus=bus).silences(reactor)
        yield add(store, args.active, 86400, NOW)
        found = yield store.active(NOW)
        assert len(found) == args.active, len(found)
        def active() -> defer.Deferred:
            return store.active(NOW)

        def baseline() -> defer.Deferred:
            d = bus.execute("HVALS", "ckpt.silences")
            return d.addCallback(lambda raws: [s for s in map(json.loads, raws) if s["starts"] <= NOW < s["ends"]])

        @defer.inlineCallbacks
        def measure(label: str):
            best = {"PING": 0.0, "baseline": 0.0, "active": 0.0}
            for round_no in range(1, args.rounds + 1):
                for name, call in (("PING", lambda: bus.execute("PING")), ("baseline", baseline),
                                   ("active", active)):
                    best[name] = max(best[name], (yield rate(call, args.calls)))
                print(f"{label}, round {round_no}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in best.items()))
            return best

        none = yield measure(f"{args.active} in force")
        yield add(store, args.ended, 60, NOW - 3600)  # ended an hour ago: kept for 7 days
        ended = yield measure(f"{args.active} in force, {args.ended} ended")
        assert len((yield store.active(NOW))) == args.active
        for label, best, goal in (("none ended", none, GOAL_NONE), (f"{args.ended} ended", ended, GOAL_ENDED)):
            ratio = best["active"] / best["baseline"]
            print(f"{label}: active() {best['active']:,.0f} calls/s ({1000 / best['active']:.2f} ms), "
                  f"HVALS baseline {best['baseline']:,.0f}/s, PING {best['PING']:,.0f}/s; "
                  f"ratio {ratio:.2f} (goal >= {goal}): {'met' if ratio >= goal else 'NOT met'}")
            result(f"silences_active ({label})", f"{best['active']:,.0f} calls/s",
                   f"HVALS all {best['baseline']:,.0f}/s", ratio, f">= {goal}", ratio >= goal,
                   "one Redis round trip (PING {:,.0f}/s)".format(best["PING"]))
    finally:
        yield bus.stopService()
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--active", type=int, default=100)
    parser.add_argument("--ended", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    task.react(main, [parser.parse_args()])
