"""Every bench, one after the other, and one table of their goals.

    python bench/run_all.py [--only bus_publish,rest_ingest] [--timeout 900]

Each bench runs as its own process with its defaults and prints its report as it goes (shown
here as it comes); its ``RESULT`` lines (bench/result.py) become the rows: the figure, its
baseline from the same run, the ratio, the goal, whether it is met, and what bounds it.
A bench that fails or prints no result gets a row that says so, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.result import PREFIX  # noqa: E402

BENCHES = ["bus_publish", "rest_ingest", "smtp_ingest", "dispatch", "alertmanager_ingest", "silences_active",
           "scale"]


def run(name: str, timeout: float) -> tuple[list[dict], str]:
    """The RESULT rows of one bench, and "" or why it gave none."""
    rows: list[dict] = []
    try:
        process = subprocess.Popen([sys.executable, str(HERE / f"{name}.py")], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        return rows, f"could not start: {exc}"
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.startswith(PREFIX):
                rows.append(json.loads(line[len(PREFIX):]))
            else:
                print(f"  {name}: {line}", end="", flush=True)
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return rows, f"killed after {timeout:.0f} s"
    if code != 0:
        return rows, f"exited with {code}"
    return rows, "" if rows else "printed no result"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one bench may take")
    args = parser.parse_args()
    chosen = [b for b in args.only.split(",") if b] or BENCHES
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; there are {', '.join(BENCHES)}")
    table = ["| bench | figure | baseline (same run) | ratio | goal | met | bounded by |", "|---|---|---|---|---|---|---|"]
    failed = False
    for name in chosen:
        print(f"== {name}", flush=True)
        rows, why = run(name, args.timeout)
        for row in rows:
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
            table.append(f"| {row['bench']} | {row['figure']} | {row['baseline']} | {ratio} | {row['goal']} | "
                         f"{'yes' if row['met'] else 'NO'} | {row['bound']} |")
        if why:
            failed = True
            table.append(f"| {name} | {why} | | | | NO | |")
    print()
    print("\n".join(table))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
