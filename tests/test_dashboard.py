"""The dashboard at /: one page that needs nothing from elsewhere."""
from __future__ import annotations

import re

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.test_web import make_api


class DashboardTests(TestCase):
    @inlineCallbacks
    def test_root_serves_the_dashboard_page_with_only_local_references(self):
        _, _, http = make_api(tokens=["s3cret"])
        response = yield http.get("http://cockpit.test/")
        page = (yield response.content()).decode()
        self.assertEqual(200, response.code)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/html"))
        self.assertIn("<title>Cockpit</title>", page)
        # the calls it makes are this cockpit's own API, and there is no outside address at all
        for path in ("/api/health", "/api/events/live", "/api/runs", "/api/ecos", "/api/alarms", "/api/docs"):
            self.assertIn(path, page)
        self.assertEqual([], re.findall(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", page))
        self.assertEqual([], re.findall(r"https?://", page))
