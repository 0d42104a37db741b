"""Scaling out: backlog drain (runs/s) and REST ingest (events/s), with one cockpit and with two, in one run.

    python bench/scale.py [--events 5000] [--seconds 5] [--connections 20] [--rounds 3]

Everything runs on loopback: a redis-server of its own and ``twistd -n cockpit`` processes,
each with its own data_dir, on that one Redis (DESIGN §9).

- Drain: a backlog of ``--events`` alarms is put on ``ckpt.alarm`` while no cockpit runs; then
  one cockpit (or two) starts and runs the subscribed action of each (4 workers each). The
  rate counts from the first run recorded to the last. Afterwards every event must have
  exactly one completed run, and the runs each process made are printed.
- Ingest: wrk POSTs the same alarm over ``--connections`` connections for ``--seconds``, to one
  cockpit, then split over two; events/s as Redis counts them (XLEN of ckpt.alarm).

Each round measures one cockpit and two back to back; the result is the median of the
rounds' ratios (goal: two drain at least 1.5x as fast as one). wrk: apt-get install -y wrk.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.result import result  # noqa: E402

from tests.redis_server import RedisServer, free_port  # noqa: E402

GOAL = 1.5
TWISTD = str(Path(sys.executable).parent / "twistd")
ACTIONS = "import os\n\ndef handle(service, event):\n    return os.environ.get('COCKPIT_BENCH_NAME')\n"
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"service": "node!n1", "method": "monitor", "msg": "disk usage 91%"}'
wrk.headers["Content-Type"] = "application/json"
"""


def request(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Cockpit:
    def __init__(self, redis_url: str, name: str):
        self.name = name
        self.data = Path(tempfile.mkdtemp(prefix=f"scale-{name}-"))
        self.port = free_port()
        (self.data / "config.toml").write_text(
            f'[cockpit]\ndata_dir = "{self.data}"\n[redis]\nurl = "{redis_url}"\n'
            f'[api]\nport = {self.port}\n[mail]\nport = 0\n[ays]\nworkers = 4\n')
        self.log = open(self.data / "twistd.log", "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "cockpit", "--config", str(self.data / "config.toml")], cwd=self.data,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COCKPIT_BENCH_NAME": name},
            stdout=self.log, stderr=subprocess.STDOUT)
        self.api = f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                code, health = request("GET", f"{self.api}/health")
                if code == 200 and health["services"]["ays"]["loaded"]:
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"cockpit {self.name} did not get ready: see {self.data / 'twistd.log'}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


_connections: dict[int, Any] = {}


def redis_int(redis: RedisServer, *command: str) -> int:
    """An integer reply, on one kept connection: polling must cost the machine next to nothing."""
    import socket

    sock = _connections.get(redis.port)
    if sock is None:
        sock = _connections[redis.port] = socket.create_connection(("127.0.0.1", redis.port)).makefile("rwb")
    sock.write((" ".join(command) + "\r\n").encode())
    sock.flush()
    line = sock.readline()
    if not line.startswith(b":"):
        raise SystemExit(f"Redis answered {line!r} to {command}")
    return int(line[1:])


def fill_backlog(redis: RedisServer, events: int) -> None:
    """``events`` alarms on ckpt.alarm, in the cockpit's own event format, through one redis-cli pipe."""
    from cockpit.events import AlarmEvent

    lines = []
    for n in range(events):
        raw = AlarmEvent(service="node!n1", method="backlog", msg=str(n), source="bench").to_json().decode()
        lines.append(f"XADD ckpt.alarm * event {json.dumps(raw)}")
    subprocess.run(["redis-cli", "-p", str(redis.port)], input="\n".join(lines) + "\n", text=True,
                   capture_output=True, check=True)


def drain(redis: RedisServer, cockpits: int, events: int) -> tuple[float, Counter]:
    """Runs/s draining ``events`` alarms with ``cockpits`` processes, and who ran how many."""
    redis.flush()
    setup = Cockpit(redis.url, "setup")
    setup.wait_ready()
    for method, path, body in (
            ("POST", "/repos", {"name": "bench"}),
            ("PUT", "/repos/bench/templates/count",
             {"files": {"service.hrd": "events.alarm =\n    handle,\n", "actions.py": ACTIONS}}),
            ("POST", "/repos/bench/blueprints", {"name": "main.yaml", "content": "count__all: {}\n"}),
            ("POST", "/repos/bench/blueprints/main.yaml/execute", None)):
        code, reply = request(method, setup.api + path, body)
        assert code < 300, (path, code, reply)
    time.sleep(1.0)  # its install run is recorded
    setup.stop()
    runs_before = redis_int(redis, "ZCARD", "ckpt.runs")
    fill_backlog(redis, events)
    procs = [Cockpit(redis.url, f"cockpit{n}") for n in range(cockpits)]
    first = last = None
    done = runs_before
    while done < runs_before + events:
        done = redis_int(redis, "ZCARD", "ckpt.runs")
        now = time.monotonic()
        if first is None and done > runs_before:
            first, first_count = now, done
        last = now
        if any(p.process.poll() is not None for p in procs):
            raise SystemExit("a cockpit ended while draining: see its twistd.log")
        time.sleep(0.05)
    rate = (done - first_count) / max(last - first, 1e-6)
    by_process = count_runs(procs[0].api, events)
    for proc in procs:
        proc.stop()
    return rate, by_process


def count_runs(api: str, events: int) -> Counter:
    """Who ran how many of the backlog's events; every event exactly once, or SystemExit."""
    runs, before = [], ""
    while True:
        code, page = request("GET", f"{api}/runs?limit=1000&action=handle{before}")
        runs.extend(page["runs"])
        if not page["next"]:
            break
        before = f"&before={page['next']}"
    guids = Counter(run["trigger"]["event_guid"] for run in runs)
    if len(guids) != events or set(guids.values()) != {1}:
        raise SystemExit(f"{len(guids)} events ran, {sum(guids.values())} runs: not each exactly once")
    return Counter(run["result"] for run in runs)


def ingest(redis: RedisServer, cockpits: int, seconds: float, connections: int) -> float:
    """Events/s POSTed with wrk, split over ``cockpits`` processes, as Redis counts them."""
    redis.flush()
    procs = [Cockpit(redis.url, f"cockpit{n}") for n in range(cockpits)]
    for proc in procs:
        proc.wait_ready()
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(WRK_SCRIPT)
    before = redis_int(redis, "XLEN", "ckpt.alarm")
    started = time.monotonic()
    loads = [subprocess.Popen(["wrk", "-t", "1", "-c", str(max(connections // cockpits, 1)), "-d", f"{max(int(seconds), 1)}s",
                               "-s", str(script), f"{proc.api}/events/alarm"], stdout=subprocess.PIPE, text=True)
             for proc in procs]
    for load in loads:
        out = load.communicate()[0]
        if load.returncode != 0 or "Non-2xx" in out:
            raise SystemExit("wrk failed, or saw answers other than 202:\n" + out)
    elapsed = time.monotonic() - started
    events = redis_int(redis, "XLEN", "ckpt.alarm") - before
    for proc in procs:
        proc.stop()
    return events / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    redis = RedisServer().start()
    try:
        drains, ingests = [], []
        for n in range(1, args.rounds + 1):
            one, by_one = drain(redis, 1, args.events)
            two, by_two = drain(redis, 2, args.events)
            drains.append((one, two))
            print(f"round {n} drain: one cockpit {one:,.0f} runs/s, two {two:,.0f} runs/s "
                  f"(ratio {two / one:.2f}); {args.events} events, each run once: "
                  f"{dict(by_one)} then {dict(sorted(by_two.items()))}")
            one_in = ingest(redis, 1, args.seconds, args.connections)
            two_in = ingest(redis, 2, args.seconds, args.connections)
            ingests.append((one_in, two_in))
            print(f"round {n} ingest: one cockpit {one_in:,.0f} events/s, two {two_in:,.0f} events/s "
                  f"(ratio {two_in / one_in:.2f})")
        drain_ratio = statistics.median(two / one for one, two in drains)
        ingest_ratio = statistics.median(two / one for one, two in ingests)
        print()
        print("| measure | one cockpit | two cockpits | ratio | goal |")
        print("|---|---|---|---|---|")
        print(f"| backlog drain | {statistics.median(o for o, _ in drains):,.0f} runs/s | "
              f"{statistics.median(t for _, t in drains):,.0f} runs/s | {drain_ratio:.2f} | >= {GOAL}: "
              f"{'met' if drain_ratio >= GOAL else 'not met'} |")
        print(f"| REST ingest | {statistics.median(o for o, _ in ingests):,.0f} events/s | "
              f"{statistics.median(t for _, t in ingests):,.0f} events/s | {ingest_ratio:.2f} | (none) |")
        result("scale (drain)", f"two cockpits {statistics.median(t for _, t in drains):,.0f} runs/s",
               f"one cockpit {statistics.median(o for o, _ in drains):,.0f} runs/s", drain_ratio, f">= {GOAL}",
               drain_ratio >= GOAL, f"{os.cpu_count()} cores shared by Redis, both cockpits and their workers")
        print(f"\nthis machine has {os.cpu_count()} cores, shared by Redis, the cockpits' reactors, their "
              "workers and the load")
    finally:
        redis.cleanup()


if __name__ == "__main__":
    main()
