"""One machine-readable line per goal, which ``bench/run_all.py`` gathers into its table.

Every bench prints its own report for a reader, then one ``RESULT {json}`` line per goal:
the figure, its baseline measured in the same run, their ratio, the goal and what bounds it.
"""
from __future__ import annotations

import json
from typing import Optional

PREFIX = "RESULT "


def result(bench: str, figure: str, baseline: str, ratio: Optional[float], goal: str, met: bool,
           bound: str) -> None:
    print(PREFIX + json.dumps({"bench": bench, "figure": figure, "baseline": baseline,
                               "ratio": None if ratio is None else round(ratio, 2), "goal": goal,
                               "met": met, "bound": bound}, ensure_ascii=False), flush=True)
