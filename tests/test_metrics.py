"""The cockpit's version, /metrics and the counters behind it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

import cockpit
from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.web import Api

ROOT = Path(__file__).parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


def make_api(**api_kwargs: Any) -> tuple[Api, MemoryBus, StubTreq]:
    bus = MemoryBus(clock=Clock())
    api = Api(config.from_dict({}), bus, **api_kwargs)
    return api, bus, StubTreq(api.app.resource())


class VersionTests(TestCase):
    def test_twistd_cockpit_version_prints_it_and_exits_0(self):
        result = subprocess.run([TWISTD, "cockpit", "--version"], capture_output=True, text=True,
                                cwd=str(ROOT), timeout=60)
        self.assertEqual((0, f"cockpit {cockpit.__version__}\n", ""),
                         (result.returncode, result.stdout, result.stderr))

    def test_the_installed_distribution_has_the_same_version(self):
        from importlib.metadata import version

        self.assertEqual(cockpit.__version__, version("cockpit"))

    @inlineCallbacks
    def test_health_and_the_openapi_document_give_the_version(self):
        api, _, client = make_api()
        response = yield client.get("http://cockpit/api/health")
        payload = yield response.json()
        self.assertEqual((200, "ok", cockpit.__version__), (response.code, payload["status"], payload["version"]))
        self.assertEqual(cockpit.__version__, api.openapi()["info"]["version"])
