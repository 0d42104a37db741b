"""REST ingest: alarm events/s POSTed to a real cockpit (publishing into Redis) against a bare Klein endpoint.

    python bench/rest_ingest.py [--seconds 5] [--connections 20] [--rounds 2]

Everything runs on loopback and stops at the end: a redis-server of its own, a cockpit
(``twistd -n cockpit`` with a [redis] config) and a bare Klein process that answers 202
without work. wrk (apt-get install -y wrk) loads each with the same alarm over the same
connections for the same time; each side's best round counts. Printed: both rates, the
ratio (goal >= 0.75), p50/p99 latency, and events/s as Redis saw them (XLEN of ckpt.alarm).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.result import result as goal_result  # noqa: E402

from tests.redis_server import RedisServer, free_port  # noqa: E402

GOAL = 0.75
TOKEN = "bench-token"
ALARM = {"service": "node!n1", "method": "monitor", "msg": "disk usage 91% on /var"}

BARE = """
import sys
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

app = Klein()

@app.route("/api/events/alarm", methods=["POST"])
def accept(request):
    request.content.read()
    request.setResponseCode(202)
    request.setHeader(b"Content-Type", b"application/json")
    return b'{"guid": "00000000-0000-4000-8000-000000000000"}'

site = Site(app.resource())
site.noisy = False
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("RESULT %d %d %f %f %d\\n", summary.requests, summary.duration,
                         latency:percentile(50), latency:percentile(99), non2xx))
end
"""


def wait_for(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answered at {url} within {timeout:.0f}s")


def run_wrk(url: str, script: str, seconds: int, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", script, url],
                         capture_output=True, text=True, timeout=seconds + 30)
    found = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+)", out.stdout)
    if found is None:
        raise SystemExit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    requests, duration_us, p50, p99, non2xx = found.groups()
    duration = int(duration_us) / 1e6
    return {"rate": int(requests) / duration, "requests": int(requests), "seconds": duration,
            "p50_ms": float(p50) / 1000, "p99_ms": float(p99) / 1000, "non2xx": int(non2xx)}


def xlen(redis: RedisServer) -> int:
    return int(redis.command("XLEN", "ckpt.alarm").strip().split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="cockpit-bench-"))
    redis = RedisServer().start()
    processes: list[subprocess.Popen] = []
    try:
        api_port, bare_port = free_port(), free_port()
        (work / "cockpit.toml").write_text(
            f'[cockpit]\ndata_dir = "{work / "data"}"\n'
            f'[redis]\nurl = "{redis.url}"\n'
            f'[api]\nhost = "127.0.0.1"\nport = {api_port}\ntokens = ["{TOKEN}"]\n'
            f'[mail]\nport = {free_port()}\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        twistd = str(Path(sys.executable).parent / "twistd")
        log = open(work / "cockpit.log", "w")
        processes.append(subprocess.Popen(
            [twistd, "-n", "--pidfile=", "--logfile", str(work / "twistd.log"), "cockpit", "--config",
             str(work / "cockpit.toml")], env=env, stdout=log, stderr=subprocess.STDOUT))
        processes.append(subprocess.Popen([sys.executable, "-c", BARE, str(bare_port)], env=env))
        wait_for(f"http://127.0.0.1:{api_port}/api/health")
        wait_for(f"http://127.0.0.1:{bare_port}/api/events/alarm")
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=json.dumps(ALARM), token=TOKEN))

        best = {"bare": None, "cockpit": None}
        redis_rate = 0.0
        for round_no in range(1, args.rounds + 1):
            bare = run_wrk(f"http://127.0.0.1:{bare_port}/api/events/alarm", str(script), args.seconds,
                           args.connections)
            before = xlen(redis)
            cockpit = run_wrk(f"http://127.0.0.1:{api_port}/api/events/alarm", str(script), args.seconds,
                              args.connections)
            stored = xlen(redis) - before
            if cockpit["non2xx"]:
                raise SystemExit(f"the cockpit answered {cockpit['non2xx']} requests with a non-2xx status")
            if stored < cockpit["requests"]:
                raise SystemExit(f"{cockpit['requests']} events were accepted but {stored} reached Redis")
            redis_rate = max(redis_rate, stored / cockpit["seconds"])
            print(f"round {round_no}: bare Klein {bare['rate']:,.0f} req/s, cockpit {cockpit['rate']:,.0f} "
                  f"events/s ({stored:,} in ckpt.alarm)")
            for name, result in (("bare", bare), ("cockpit", cockpit)):
                if best[name] is None or result["rate"] > best[name]["rate"]:
                    best[name] = result
        bare, cockpit = best["bare"], best["cockpit"]
        ratio = cockpit["rate"] / bare["rate"]
        print(f"bare Klein 202:       {bare['rate']:10,.0f} req/s     p50 {bare['p50_ms']:.2f} ms  "
              f"p99 {bare['p99_ms']:.2f} ms")
        print(f"cockpit POST alarm:   {cockpit['rate']:10,.0f} events/s  p50 {cockpit['p50_ms']:.2f} ms  "
              f"p99 {cockpit['p99_ms']:.2f} ms")
        print(f"seen by Redis (XLEN): {redis_rate:10,.0f} events/s")
        print(f"ratio {ratio:.2f} (goal >= {GOAL}) over {args.connections} connections: "
              f"{'ok' if ratio >= GOAL else 'BELOW GOAL'}")
        goal_result("rest_ingest", f"{cockpit['rate']:,.0f} events/s", f"bare Klein 202 {bare['rate']:,.0f} req/s", ratio,
               f">= {GOAL}", ratio >= GOAL, "validation and the Redis publish on one reactor thread")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
