"""Every class is handed its clock: no module of the cockpit reads the time or the global reactor itself."""
from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import TestCase

import cockpit

PACKAGE = Path(cockpit.__file__).parent
ROOT = PACKAGE.parent
# the root of the service tree, and the command that runs a reactor: where the global reactor is chosen
REACTOR_ROOTS = {"cockpit/tap.py"}


def clock_reads(source: str) -> list[tuple[int, str]]:
    """(line, what) for each ``time.time()`` call and each import of the global reactor in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "time" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "time":
            found.append((node.lineno, "time.time()"))
        elif isinstance(node, ast.ImportFrom) and node.module == "twisted.internet" \
                and any(alias.name == "reactor" for alias in node.names):
            found.append((node.lineno, "from twisted.internet import reactor"))
        elif isinstance(node, ast.Import) and any(alias.name == "twisted.internet.reactor" for alias in node.names):
            found.append((node.lineno, "import twisted.internet.reactor"))
    return found


class ClockTests(TestCase):
    def test_the_scan_finds_both_kinds(self):
        source = "import time\nfrom twisted.internet import defer, reactor\nstarted = time.time()\n"
        self.assertEqual([(2, "from twisted.internet import reactor"), (3, "time.time()")],
                         sorted(clock_reads(source)))

    def test_no_module_reads_the_time_or_the_global_reactor_itself(self):
        offences = []
        for path in sorted(PACKAGE.rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            for line, what in clock_reads(path.read_text(encoding="utf-8")):
                if what != "time.time()" and name in REACTOR_ROOTS:
                    continue
                offences.append(f"{name}:{line}: {what}")
        self.assertEqual([], offences, "hand the clock or reactor in instead")
