from __future__ import annotations

import io
import json

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from cockpit.logs import json_observer


class JsonLogTests(TestCase):
    def test_each_event_is_one_json_line_with_its_fields(self):
        out = io.StringIO()
        log = Logger(namespace="cockpit.test", observer=json_observer(out))
        log.info("delivered {count} events", count=3)
        log.warn("odd {thing}", thing=object())
        lines = out.getvalue().splitlines()
        self.assertEqual(2, len(lines))
        first = json.loads(lines[0])
        self.assertEqual(("info", "cockpit.test", "delivered 3 events", 3),
                         (first["level"], first["namespace"], first["message"], first["count"]))
        second = json.loads(lines[1])
        self.assertEqual("warn", second["level"])
        self.assertTrue(second["thing"].startswith("<object"))

    def test_failures_carry_their_traceback(self):
        out = io.StringIO()
        log = Logger(namespace="cockpit.test", observer=json_observer(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke")
        record = json.loads(out.getvalue())
        self.assertEqual("critical", record["level"])
        self.assertIn("ZeroDivisionError", record["traceback"])
