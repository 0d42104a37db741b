"""Events/s through RedisBus.publish against raw pipelined txredisapi XADD+PUBLISH, in one run.

    python bench/bus_publish.py [--events 20000] [--window 100] [--rounds 3]

Starts a redis-server of its own on a free port (loopback only) and stops it at the end.
Both sides publish the same events, serialised the same way, with the same number in
flight; the baseline writes XADD+PUBLISH in a txredisapi pipeline with no MULTI/EXEC.
Goal: the bus reaches at least 0.8 of the raw rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.result import result  # noqa: E402

import txredisapi  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from cockpit.backends.redis import RedisBus  # noqa: E402
from cockpit.bus import stream_key  # noqa: E402
from cockpit.config import RedisSection  # noqa: E402
from cockpit.events import AlarmEvent  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

GOAL = 0.8


def make_events(count: int) -> list[AlarmEvent]:
    return [AlarmEvent(service=f"node!n{i % 50}", method="monitor", msg=f"disk usage {i % 100}% on /var")
            for i in range(count)]


@defer.inlineCallbacks
def raw_rate(reactor, port: int, events: list[AlarmEvent], window: int):
    factory = txredisapi.RedisFactory("bench", 0, 1, isLazy=True, convertNumbers=False)
    factory.startConnecting(TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    conn = yield factory.deferred
    started = time.perf_counter()
    for i in range(0, len(events), window):
        pipe = yield conn.pipeline()
        for event in events[i:i + window]:
            raw = event.to_json()
            key = stream_key(event.type)
            pipe.execute_command("XADD", key, "MAXLEN", "~", "100000", "*", "event", raw)
            pipe.execute_command("PUBLISH", key, raw)
        yield pipe.execute_pipeline()
    elapsed = time.perf_counter() - started
    yield factory.disconnect()
    return len(events) / elapsed


@defer.inlineCallbacks
def bus_rate(reactor, port: int, events: list[AlarmEvent], window: int):
    bus = RedisBus(RedisSection(url=f"redis://127.0.0.1:{port}/0"), reactor=reactor)
    bus.startService()
    yield bus.when_connected()
    started = time.perf_counter()
    for i in range(0, len(events), window):
        yield defer.gatherResults([bus.publish(event) for event in events[i:i + window]])
    elapsed = time.perf_counter() - started
    yield bus.stopService()
    return len(events) / elapsed


@defer.inlineCallbacks
def main(reactor, args):
    server = RedisServer().start()
    try:
        events = make_events(args.events)
        raw_best = bus_best = 0.0
        for round_no in range(1, args.rounds + 1):
            server.flush()
            raw = yield raw_rate(reactor, server.port, events, args.window)
            server.flush()
            bus = yield bus_rate(reactor, server.port, events, args.window)
            raw_best, bus_best = max(raw_best, raw), max(bus_best, bus)
            print(f"round {round_no}: raw pipelined {raw:,.0f} events/s, RedisBus {bus:,.0f} events/s")
        stored = server.command("XLEN", "ckpt.alarm").strip()
        ratio = bus_best / raw_best
        print(f"raw pipelined XADD+PUBLISH : {raw_best:,.0f} events/s (best of {args.rounds})")
        print(f"RedisBus.publish (MULTI/EXEC): {bus_best:,.0f} events/s (best of {args.rounds}); "
              f"last run stored {stored} entries")
        print(f"ratio {ratio:.2f} (goal >= {GOAL}): {'met' if ratio >= GOAL else 'NOT met'}")
        result("bus_publish", f"{bus_best:,.0f} events/s", f"raw pipelined XADD+PUBLISH {raw_best:,.0f}/s", ratio,
               f">= {GOAL}", ratio >= GOAL, "one Redis round trip per MULTI/EXEC batch; Redis's own CPU")
    finally:
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--window", type=int, default=100, help="publishes in flight at once")
    parser.add_argument("--rounds", type=int, default=3)
    task.react(main, [parser.parse_args()])
