"""AYS dispatch: action runs/s sustained, and latency from POST to action start.

    python bench/dispatch.py [--events 5000] [--rate 200] [--seconds 10] [--workers 4]

Starts a redis-server of its own and a real cockpit (``twistd -n cockpit``) with 4
action workers on free loopback ports, and stops both at the end. One service
subscribes a trivial action to alarm events.

1. Throughput: ``--events`` alarms are published before the cockpit starts; the cockpit
   drains that backlog. Runs/s = runs / (last run ended - first run started), read from
   the run history (in Redis). Baseline, measured in the same run on the same backlog: a bare
   consumer group that only acknowledges (the bus's own ceiling). Goal: >= 1000 runs/s.
2. Latency: alarms are POSTed to /api/events/alarm at ``--rate``/s, each carrying its
   send time; the action returns how long ago that was when it started. Goal: p99 < 20 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from bench.result import result  # noqa: E402

import treq  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

from cockpit.backends.redis import RedisBus  # noqa: E402
from cockpit.backends.redis.runs import RedisRunHistory  # noqa: E402
from cockpit.config import RedisSection  # noqa: E402
from cockpit.events import AlarmEvent  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402

GOAL_RUNS = 1000.0
GOAL_P99_MS = 20.0
ACTIONS = """
import time

def trivial(service, event):
    if event.method == "latency":
        return time.time() - float(event.msg)
    return None
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@defer.inlineCallbacks
def trivial_runs(history: RedisRunHistory):
    runs, before = [], None
    while True:
        page = yield history.list(limit=1000, before=before, action="trivial")
        runs += page
        if len(page) < 1000:
            return runs
        before = page[-1].id


@defer.inlineCallbacks
def wait_until(reactor, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = yield defer.maybeDeferred(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"dispatch bench: timed out waiting for {what}")
        yield task.deferLater(reactor, 0.05, lambda: None)


@defer.inlineCallbacks
def baseline_rate(reactor, bus: RedisBus, count: int):
    """Events/s a consumer group that only acknowledges reaches on the same backlog."""
    seen = []
    consumer = bus.consumer("bench-baseline", lambda event, delivery: seen.append(time.perf_counter()),
                            types=["alarm"], concurrency=256)
    started = time.perf_counter()
    consumer.startService()
    yield wait_until(reactor, lambda: len(seen) >= count, 120, "the baseline consumer")
    yield wait_until(reactor, lambda: not consumer.inflight, 30, "the baseline acks")
    elapsed = time.perf_counter() - started
    yield consumer.stopService()
    return count / elapsed


@defer.inlineCallbacks
def main(reactor, args):
    redis = RedisServer().start()
    work = Path(tempfile.mkdtemp(prefix="cockpit-bench-dispatch-"))
    api_port, mail_port = free_port(), free_port()
    config = work / "cockpit.toml"
    config.write_text(f"""
[cockpit]
data_dir = "{work / 'data'}"
[redis]
url = "{redis.url}"
[api]
port = {api_port}
[mail]
port = {mail_port}
[ays]
workers = {args.workers}
action_timeout = 30.0
""")
    # the repository, made on disk before the cockpit starts (the REST routes are tested elsewhere)
    repo = work / "data" / "repos" / "bench"
    template = repo / "servicetemplates" / "node"
    template.mkdir(parents=True)
    for sub in ("blueprints", "services"):
        (repo / sub).mkdir()
    (repo / ".ays").write_text(json.dumps({"name": "bench", "created": time.time(), "blueprints": {}}))
    (template / "service.hrd").write_text("events.alarm =\n    trivial,\n")
    (template / "actions.py").write_text(ACTIONS)
    service = repo / "services" / "node!bench"
    service.mkdir()
    (service / "service.json").write_text(json.dumps({
        "key": "node!bench", "role": "node", "instance": "bench", "template": "node", "args": {},
        "states": {}, "created": time.time(), "updated": time.time()}))

    bus = RedisBus(RedisSection(url=redis.url), reactor=reactor)
    bus.startService()
    history = RedisRunHistory(bus, reactor)  # only read from: not started, so it never prunes

    def count_runs():
        return history.count(action="trivial")

    cockpit = None
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    try:
        yield bus.when_connected()
        events = [AlarmEvent(service="node!bench", method="throughput", msg="") for _ in range(args.events)]
        for i in range(0, len(events), 500):
            yield defer.gatherResults([bus.publish(e) for e in events[i:i + 500]])
        baseline = yield baseline_rate(reactor, bus, args.events)

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        twistd = str(Path(sys.executable).parent / "twistd")
        cockpit = subprocess.Popen([twistd, "-n", "--pidfile=",
                                    "--logfile", str(work / "cockpit.log"), "cockpit", "--config", str(config)],
                                   cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        yield wait_until(reactor, lambda: count_runs().addCallback(lambda n: n >= args.events), 300,
                         "the backlog's runs")
        backlog = yield trivial_runs(history)
        first, last, runs = min(r.started for r in backlog), max(r.ended for r in backlog), len(backlog)
        rate = runs / (last - first)

        # latency: POST at a steady rate, each alarm carrying its send time
        base = f"http://127.0.0.1:{api_port}"
        yield wait_until(reactor, lambda: treq.get(base + "/api/health", pool=pool).addCallback(
            lambda r: r.code == 200).addErrback(lambda f: False), 30, "the API")
        total = int(args.rate * args.seconds)
        posts = []

        def post_one():
            body = json.dumps({"service": "node!bench", "method": "latency", "msg": repr(time.time())})
            d = treq.post(base + "/api/events/alarm", data=body.encode(), pool=pool,
                          headers={"Content-Type": ["application/json"]})
            posts.append(d.addCallback(lambda r: treq.content(r).addCallback(lambda _: r.code)))

        sender = task.LoopingCall(post_one)
        sender.start(1.0 / args.rate)
        yield wait_until(reactor, lambda: len(posts) >= total, args.seconds * 3 + 30, "the POSTs")
        sender.stop()
        codes = yield defer.gatherResults(posts)
        refused = sum(1 for code in codes if code != 202)
        yield wait_until(reactor, lambda: count_runs().addCallback(lambda n: n >= args.events + total - refused),
                         120, "the latency runs")
        lags = [r.result * 1000 for r in (yield trivial_runs(history)) if r.result is not None]
        p50, p99 = percentile(lags, 0.50), percentile(lags, 0.99)

        verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        print(f"throughput: {runs} runs in {last - first:.2f} s = {rate:.0f} runs/s "
              f"(goal >= {GOAL_RUNS:.0f}/s: {verdict(rate >= GOAL_RUNS)})")
        print(f"baseline:   a bare consumer group (ack only) on the same backlog: {baseline:.0f} events/s; "
              f"dispatch reaches {rate / baseline:.2f} of it")
        print(f"latency:    POST -> action start at {args.rate}/s over {args.seconds} s ({len(lags)} runs, "
              f"{refused} refused): p50 {p50:.1f} ms, p99 {p99:.1f} ms "
              f"(goal p99 < {GOAL_P99_MS:.0f} ms: {verdict(p99 < GOAL_P99_MS)})")
        result("dispatch", f"{rate:,.0f} runs/s", f"bare consumer group {baseline:,.0f} events/s", rate / baseline,
               f">= {GOAL_RUNS:.0f} runs/s", rate >= GOAL_RUNS, "the worker processes on 2 cores")
        result("dispatch latency", f"p99 {p99:.1f} ms", f"p50 {p50:.1f} ms", None, f"p99 < {GOAL_P99_MS:.0f} ms",
               p99 < GOAL_P99_MS, "a worker's start of the action")
    finally:
        yield pool.closeCachedConnections()
        if cockpit is not None:
            cockpit.send_signal(signal.SIGTERM)
            try:
                cockpit.wait(30)
            except subprocess.TimeoutExpired:
                cockpit.kill()
                cockpit.wait()
        yield bus.stopService()
        redis.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    arguments = parser.parse_args()
    task.react(main, [arguments])
