"""Alertmanager webhook ingest: alarms/s in batches of 50 against the REST alarm ingest, on one real cockpit.

    python bench/alertmanager_ingest.py [--seconds 5] [--connections 20] [--rounds 3] [--alerts 50] [--redis]

Everything runs on loopback and stops at the end: a cockpit (``twistd -n cockpit``, on the
embedded bus, or with ``--redis`` on a redis-server of its own). wrk (apt-get install -y wrk)
loads it over the same connections for the same time, back to back in each round:
- the webhook: Alertmanager-shaped bodies of ``--alerts`` alerts, every alert with a
  fingerprint of its own, so that each one is claimed and published (none is a duplicate);
- REST: ``POST /api/events/alarm``, one alarm per request.
Printed per round: alarms/s through the webhook, events/s through REST and their ratio;
then the median of the rounds' ratios (goal >= 0.8). With ``--redis`` the alarms Redis
stored (XLEN of ckpt.alarm) are checked against what was accepted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.result import result  # noqa: E402

from bench.rest_ingest import ALARM, TOKEN, wait_for  # noqa: E402
from tests.redis_server import RedisServer, free_port  # noqa: E402

GOAL = 0.8

REST_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %f %f %d 0\\n", summary.requests, summary.duration,
                         latency:percentile(50), latency:percentile(99), summary.errors.status))
end
"""

# each request a new body: fingerprints <run><thread><counter><n> are never repeated, so no alert is a duplicate
WEBHOOK_SCRIPT = """
local threads = {{}}
local next_id = 0
setup = function(thread)
  next_id = next_id + 1
  thread:set("id", next_id)
  table.insert(threads, thread)
end

local counter = 0
local run = 0
init = function(args)
  run = tonumber(args[1])
end
local head = '{head}'
local alert_a = '{alert_a}'
local alert_b = '{alert_b}'
local headers = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {token}"}}
not_all_published = 0  -- a global: done() reads it from each thread

request = function()
  counter = counter + 1
  local parts = {{}}
  for n = 1, {alerts} do
    parts[n] = alert_a .. string.format("%04x%02x%06x%04x", run, id, counter, n) .. alert_b
  end
  return wrk.format("POST", "/api/webhooks/alertmanager", headers, head .. table.concat(parts, ",") .. "]}}")
end

response = function(status, headers, body)
  if status == 200 and not string.find(body, '"duplicates": 0', 1, true) then
    not_all_published = not_all_published + 1
  end
end

done = function(summary, latency, requests)
  local odd = 0
  for _, thread in ipairs(threads) do
    odd = odd + thread:get("not_all_published")
  end
  io.write(string.format("RESULT %d %d %f %f %d %d\\n", summary.requests, summary.duration,
                         latency:percentile(50), latency:percentile(99), summary.errors.status, odd))
end
"""


def webhook_script(alerts: int) -> str:
    """The wrk script posting bodies of ``alerts`` alerts, as Alertmanager 0.25 writes them."""
    top = {"version": "4", "groupKey": '{}:{alertname="DiskFull"}', "truncatedAlerts": 0, "status": "firing",
           "receiver": "cockpit", "groupLabels": {"alertname": "DiskFull"}, "commonLabels": {},
           "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "alerts": []}
    alert = {"status": "firing",
             "labels": {"alertname": "DiskFull", "job": "node", "instance": "web1:9100", "severity": "critical",
                        "mountpoint": "/var"},
             "annotations": {"summary": "disk usage 91% on /var"},
             "startsAt": "2024-05-01T12:00:00.123456789Z", "endsAt": "0001-01-01T00:00:00Z",
             "generatorURL": "http://prometheus:9090/graph?g0.expr=disk_used", "fingerprint": "@"}

    def lua(text: str) -> str:  # inside a single-quoted Lua string
        return text.replace("\\", "\\\\").replace("'", "\\'")

    alert_a, alert_b = json.dumps(alert).split("@")
    return WEBHOOK_SCRIPT.format(head=lua(json.dumps(top)[:-2]), alert_a=lua(alert_a), alert_b=lua(alert_b),
                                 token=TOKEN, alerts=alerts)


def run_wrk(url: str, script: Path, seconds: int, connections: int, run: int = 0) -> dict:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
                          url, "--", str(run)], capture_output=True, text=True, timeout=seconds + 30)
    found = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+) (\d+)", out.stdout)
    if found is None:
        raise SystemExit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    requests, duration_us, p50, p99, non2xx, odd = found.groups()
    if int(non2xx) or int(odd):
        raise SystemExit(f"{url}: {non2xx} answers were not 2xx and {odd} did not publish every alert")
    duration = int(duration_us) / 1e6
    return {"requests": int(requests), "seconds": duration, "rate": int(requests) / duration,
            "p50_ms": float(p50) / 1000, "p99_ms": float(p99) / 1000}


def xlen(redis: Optional[RedisServer]) -> int:
    if redis is None:
        return 0
    return int(redis.command("XLEN", "ckpt.alarm").strip().split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alerts", type=int, default=50, help="alerts per webhook body")
    parser.add_argument("--redis", action="store_true", help="the cockpit on a redis-server (default: embedded)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="cockpit-bench-"))
    redis = RedisServer().start() if args.redis else None
    cockpit: Optional[subprocess.Popen] = None
    try:
        api_port = free_port()
        # stream_maxlen above what a run publishes: XLEN counts every alarm stored
        (work / "cockpit.toml").write_text(
            f'[cockpit]\ndata_dir = "{work / "data"}"\n'
            + (f'[redis]\nurl = "{redis.url}"\nstream_maxlen = 100000000\n' if redis else "")
            + f'[api]\nhost = "127.0.0.1"\nport = {api_port}\ntokens = ["{TOKEN}"]\n'
            f'[mail]\nport = {free_port()}\n')
        twistd = str(Path(sys.executable).parent / "twistd")
        with open(work / "cockpit.log", "w") as log:
            cockpit = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "--logfile", str(work / "twistd.log"), "cockpit", "--config",
                 str(work / "cockpit.toml")], env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{api_port}"
        wait_for(f"{base}/api/health")
        rest_script, hook_script = work / "rest.lua", work / "webhook.lua"
        rest_script.write_text(REST_SCRIPT.format(body=json.dumps(ALARM), token=TOKEN))
        hook_script.write_text(webhook_script(args.alerts))

        ratios = []
        bus = "Redis" if redis else "the embedded bus"
        print(f"one cockpit on {bus}, {args.connections} connections, {args.seconds} s a side, "
              f"{args.alerts} alerts a webhook body")
        for round_no in range(1, args.rounds + 1):
            before = xlen(redis)
            hook = run_wrk(f"{base}/api/webhooks/alertmanager", hook_script, args.seconds, args.connections,
                           round_no)
            stored = xlen(redis) - before
            rest = run_wrk(f"{base}/api/events/alarm", rest_script, args.seconds, args.connections)
            alarms = hook["requests"] * args.alerts
            if redis is not None and stored < alarms:
                raise SystemExit(f"{alarms} alerts were answered 200 but {stored} reached Redis")
            alarm_rate = alarms / hook["seconds"]
            ratio = alarm_rate / rest["rate"]
            ratios.append(ratio)
            print(f"round {round_no}: webhook {alarm_rate:10,.0f} alarms/s ({hook['rate']:,.0f} bodies/s, "
                  f"p50 {hook['p50_ms']:.1f} ms, p99 {hook['p99_ms']:.1f} ms)   REST {rest['rate']:8,.0f} events/s "
                  f"(p50 {rest['p50_ms']:.2f} ms)   ratio {ratio:.2f}")
        ratio = statistics.median(ratios)
        print(f"median ratio {ratio:.2f} (goal >= {GOAL}): {'ok' if ratio >= GOAL else 'BELOW GOAL'}")
        result("alertmanager_ingest", f"{alarm_rate:,.0f} alarms/s (last round)",
               f"REST {rest['rate']:,.0f} events/s (last round)", ratio, f">= {GOAL}", ratio >= GOAL,
               "parsing and validating each alert; one publish per alert")
    finally:
        if cockpit is not None:
            cockpit.terminate()
            try:
                cockpit.wait(10)
            except subprocess.TimeoutExpired:
                cockpit.kill()
        if redis is not None:
            redis.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
