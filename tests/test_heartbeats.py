"""Heartbeats (docs/design.md §11): beats, the one alarm a silence fires, its resolve, leases; both stores, HTTP,
real cockpits and the real Sentry SDK."""
from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any

from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator
from treq.testing import StubTreq
from twisted.internet import defer, reactor, utils
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config, events
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.embedded.groups import MemoryGroupStore
from cockpit.backends.embedded.heartbeats import MemoryHeartbeatStore
from cockpit.backends.redis import RedisBus
from cockpit.backends.redis.heartbeats import RedisHeartbeatStore
from cockpit.bus import BusUnavailable
from cockpit.config import RedisSection
from cockpit.groups import alarm_group_id
from cockpit.heartbeats import HEARTBEAT_NAMESPACE, LEASE, MAX_TIMEOUT, Heartbeats, HeartbeatsApi, deadline_text
from cockpit.openapi import downgrade_to_30
from cockpit.sentry import SentryApi, check_in_timeout
from cockpit.web import Api
from tests.cockpits import Cockpit, call, eventually, spawn_cockpit
from tests.redis_server import free_port, shared_server, started_bus

START = 1_700_000_000.0


def guid(name: str, deadline: float, beat: float) -> str:
    """A firing's guid: a lateness is its deadline and the beat before it."""
    return str(uuid.uuid5(HEARTBEAT_NAMESPACE, f"{name}/firing/{deadline_text(deadline)}/{beat!r}"))


def resolved_guid(name: str, firing: str) -> str:
    return str(uuid.uuid5(HEARTBEAT_NAMESPACE, f"{name}/resolved/{firing}"))


class RefusingBus(MemoryBus):
    """The embedded bus, refusing every event while ``down``."""

    down = False

    def publish(self, event):
        if self.down:
            return defer.fail(BusUnavailable("the bus is down (a test's)"))
        return super().publish(event)


# ---------------------------------------------------------------------------
# The rules, on a Clock, for both stores
# ---------------------------------------------------------------------------

class _Rules:
    """The same tests for each store; a subclass says how to make one, and how to break its bus."""

    timeout = 20

    def make(self, clock: Clock) -> Any:
        """``(store, bus)``; may return a Deferred."""
        raise NotImplementedError

    def break_bus(self) -> None:
        raise NotImplementedError

    def mend_bus(self) -> None:
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.store, self.bus = yield defer.maybeDeferred(self.make, self.clock)
        self.heartbeats = self.service(self.store, self.bus)

    def service(self, store: Any, bus: Any) -> Heartbeats:
        heartbeats = Heartbeats(store, bus, self.clock)
        heartbeats.startService()
        self.addCleanup(heartbeats.stopService)
        return heartbeats

    @inlineCallbacks
    def paused(self):
        """No looks at the deadlines until ``resume()``: the test plays the processes' parts itself."""
        yield self.heartbeats.stopService()

    def resume(self) -> None:
        self.heartbeats.startService()

    @inlineCallbacks
    def advance(self, seconds: float):
        """Let ``seconds`` pass on the clock, and the look at the deadlines it starts finish."""
        self.clock.advance(seconds)
        yield self.heartbeats.idle()

    @inlineCallbacks
    def alarms(self):
        """The heartbeat alarms on the bus, oldest first, as dicts."""
        found = yield self.bus.recent("alarm", 1000)
        return [event.to_dict() for _, event in reversed(found) if event.source == "heartbeat"]

    @inlineCallbacks
    def listed(self):
        found, after = yield self.heartbeats.page(100, None)
        self.assertIsNone(after)
        return {beat["name"]: beat for beat in found}

    # -- a beat, a silence, a beat ------------------------------------------------------
    @inlineCallbacks
    def test_a_beat_is_listed_ok_with_the_default_timeout(self):
        reply = yield self.heartbeats.beat("backup")
        self.assertEqual({"name": "backup", "timeout": 300.0, "last_beat": START, "state": "ok", "late_since": None},
                         reply)
        self.assertEqual({"backup": reply}, (yield self.listed()))

    @inlineCallbacks
    def test_the_deadline_passing_fires_one_alarm_and_more_time_fires_no_more(self):
        yield self.heartbeats.beat("backup")
        yield self.advance(299)
        self.assertEqual([], (yield self.alarms()))
        self.assertEqual("ok", (yield self.listed())["backup"]["state"])
        yield self.advance(2)
        [alarm] = yield self.alarms()
        self.assertEqual({"type": "alarm", "source": "heartbeat", "guid": guid("backup", START + 300, START),
                          "epoch": int(START) + 301, "service": "heartbeat!backup", "method": "heartbeat",
                          "msg": "no heartbeat for 300 s", "status": "firing", "severity": "critical",
                          "labels": {}, "annotations": {}, "fingerprint": "heartbeat:backup", "url": ""}, alarm)
        listed = (yield self.listed())["backup"]
        self.assertEqual(("late", START + 300), (listed["state"], listed["late_since"]))
        for _ in range(5):
            yield self.advance(LEASE + 1)
        yield self.advance(86400)
        self.assertEqual(1, len((yield self.alarms())))
        self.assertEqual(1, self.heartbeats.fired)

    @inlineCallbacks
    def test_the_next_beat_publishes_the_resolved_alarm_and_a_later_silence_fires_again(self):
        yield self.heartbeats.beat("backup", 10)
        yield self.advance(11)
        yield self.advance(50)
        reply = yield self.heartbeats.beat("backup")
        self.assertEqual(("ok", 10.0, START + 61), (reply["state"], reply["timeout"], reply["last_beat"]))
        firing, resolved = yield self.alarms()
        self.assertEqual(("resolved", resolved_guid("backup", firing["guid"]), "heartbeat:backup", int(START) + 61,
                          "heartbeat received again"),
                         (resolved["status"], resolved["guid"], resolved["fingerprint"], resolved["epoch"],
                          resolved["msg"]))
        yield self.advance(5)
        self.assertEqual(2, len((yield self.alarms())))  # nothing more while it beats
        yield self.advance(6)
        alarms = yield self.alarms()
        self.assertEqual(["firing", "resolved", "firing"], [alarm["status"] for alarm in alarms])
        self.assertEqual(guid("backup", START + 71, START + 61), alarms[2]["guid"])

    @inlineCallbacks
    def test_the_alarms_open_resolve_and_reopen_one_alarm_group(self):
        groups = MemoryGroupStore(self.clock)
        yield self.heartbeats.beat("backup", 1)
        yield self.advance(1)  # late at once: the firing and the resolve share a second
        yield self.heartbeats.beat("backup")
        yield self.heartbeats.fail("backup")  # and an error in that second too
        yield self.heartbeats.beat("backup")
        alarms = yield self.alarms()
        self.assertEqual(["firing", "resolved", "firing", "resolved"], [alarm["status"] for alarm in alarms])
        states = []
        for alarm in alarms:
            event = events.from_data(alarm)
            self.assertTrue((yield groups.record(event)))  # each one new: no guid repeats another
            group = yield groups.get("alarm", alarm_group_id(event))
            states.append(group["state"])
        self.assertEqual(["firing", "resolved", "firing", "resolved"], states)
        self.assertEqual(2, group["count"])

    @inlineCallbacks
    def test_a_new_timeout_is_kept_for_the_beats_after_it(self):
        yield self.heartbeats.beat("backup", 60)
        reply = yield self.heartbeats.beat("backup", 10)
        self.assertEqual(10.0, reply["timeout"])
        yield self.advance(5)
        yield self.heartbeats.beat("backup")  # no timeout: the one it has
        yield self.advance(9)
        self.assertEqual([], (yield self.alarms()))
        yield self.advance(2)
        [alarm] = yield self.alarms()
        self.assertEqual(("no heartbeat for 10 s", guid("backup", START + 15, START + 5)),
                         (alarm["msg"], alarm["guid"]))
        yield self.heartbeats.beat("backup", MAX_TIMEOUT * 10)  # bounded
        self.assertEqual(MAX_TIMEOUT, (yield self.listed())["backup"]["timeout"])

    @inlineCallbacks
    def test_heartbeats_are_listed_by_name_a_page_at_a_time(self):
        for name in ("c", "a", "b.2", "b_1"):
            yield self.heartbeats.beat(name)
        first, after = yield self.heartbeats.page(2, None)
        self.assertEqual((["a", "b.2"], "b.2"), ([beat["name"] for beat in first], after))
        second, after = yield self.heartbeats.page(2, after)
        self.assertEqual((["b_1", "c"], None), ([beat["name"] for beat in second], after))

    # -- leases ------------------------------------------------------------------------------
    @inlineCallbacks
    def test_a_claim_whose_publish_failed_is_retried_after_its_lease(self):
        yield self.heartbeats.beat("backup", 10)
        self.break_bus()
        yield self.advance(11)
        self.mend_bus()
        self.assertEqual([], (yield self.alarms()))
        yield self.advance(LEASE - 2)  # the claim is still leased: nobody retries yet
        self.assertEqual([], (yield self.alarms()))
        yield self.advance(3)
        yield self.advance(LEASE + 1)
        [alarm] = yield self.alarms()
        self.assertEqual(guid("backup", START + 10, START), alarm["guid"])

    @inlineCallbacks
    def test_a_process_that_died_with_a_claim_leaves_it_to_another_after_the_lease(self):
        yield self.paused()
        yield self.heartbeats.beat("backup", 10)
        self.clock.advance(10)
        [work] = yield self.store.claim(LEASE, 100)  # the claim of a process that dies before it publishes
        self.assertEqual("fire", work.action)
        self.assertEqual([], (yield self.store.claim(LEASE, 100)))  # leased: no one else has it
        self.resume()
        yield self.advance(LEASE - 1)
        self.assertEqual([], (yield self.alarms()))
        yield self.advance(2)
        [alarm] = yield self.alarms()
        self.assertEqual(work.event().to_dict(), alarm)

    @inlineCallbacks
    def test_a_beat_while_the_alarm_is_being_published_leaves_its_resolve_owed(self):
        yield self.paused()
        yield self.heartbeats.beat("backup", 10)
        self.clock.advance(10)
        [work] = yield self.store.claim(LEASE, 100)
        reply = yield self.heartbeats.beat("backup")  # it has not fired yet: the beat owes nothing
        self.assertEqual("ok", reply["state"])
        yield self.bus.publish(work.event())
        yield self.store.confirm(work)
        self.resume()
        yield self.advance(1)
        self.assertEqual(["firing", "resolved"], [alarm["status"] for alarm in (yield self.alarms())])
        yield self.advance(5)
        self.assertEqual(2, len((yield self.alarms())))

    @inlineCallbacks
    def test_a_beat_whose_resolve_cannot_be_published_is_refused_and_the_resolve_follows(self):
        yield self.heartbeats.beat("backup", 10)
        yield self.advance(11)
        self.break_bus()
        yield self.assertFailure(self.heartbeats.beat("backup"), BusUnavailable)
        self.mend_bus()
        yield self.advance(LEASE + 1)
        self.assertEqual(["firing", "resolved"], [alarm["status"] for alarm in (yield self.alarms())])
        reply = yield self.heartbeats.beat("backup")  # the client's retry: nothing more to publish
        self.assertEqual("ok", reply["state"])
        self.assertEqual(2, len((yield self.alarms())))

    # -- check-ins ---------------------------------------------------------------------------
    @inlineCallbacks
    def test_a_check_in_error_fires_at_once_and_only_an_ok_beat_resolves_it(self):
        yield self.heartbeats.check_in("nightly", "ok", 3600)
        reply = yield self.heartbeats.check_in("nightly", "error")
        self.assertEqual(("late", START, 3600.0), (reply["state"], reply["late_since"], reply["timeout"]))
        [alarm] = yield self.alarms()
        self.assertEqual(("firing", "the check-in reported an error", "heartbeat!nightly"),
                         (alarm["status"], alarm["msg"], alarm["service"]))
        yield self.heartbeats.check_in("nightly", "error")  # fired already
        reply = yield self.heartbeats.check_in("nightly", "in_progress")  # a new run: still in error
        self.assertEqual("late", reply["state"])
        yield self.advance(LEASE + 1)
        self.assertEqual(1, len((yield self.alarms())))
        reply = yield self.heartbeats.check_in("nightly", "ok")
        self.assertEqual("ok", reply["state"])
        self.assertEqual(["firing", "resolved"], [alarm["status"] for alarm in (yield self.alarms())])

    @inlineCallbacks
    def test_a_check_in_error_names_a_heartbeat_that_never_beat(self):
        reply = yield self.heartbeats.check_in("fresh", "error")
        self.assertEqual({"name": "fresh", "timeout": 300.0, "last_beat": None, "state": "late", "late_since": START},
                         reply)
        self.assertEqual(1, len((yield self.alarms())))

    # -- several processes -----------------------------------------------------------------
    @inlineCallbacks
    def test_two_services_on_one_store_fire_once(self):
        other = self.service(*(yield defer.maybeDeferred(self.make, self.clock)))
        for n in range(20):
            yield (self.heartbeats if n % 2 else other).beat(f"job{n}", 5)
        self.clock.advance(6)
        yield defer.gatherResults([self.heartbeats.idle(), other.idle()])
        yield defer.gatherResults([self.heartbeats.check(), other.check()])
        self.assertEqual(20, self.heartbeats.fired + other.fired)
        self.assertEqual(sorted(guid(f"job{n}", START + 5, START) for n in range(20)),
                         sorted(alarm["guid"] for alarm in (yield self.alarms())))


class MemoryRulesTests(_Rules, TestCase):
    def make(self, clock: Clock) -> Any:
        if not hasattr(self, "shared"):
            self.shared = (MemoryHeartbeatStore(clock), RefusingBus(clock=clock))
        return self.shared

    def break_bus(self) -> None:
        self.bus.down = True

    def mend_bus(self) -> None:
        self.bus.down = False


class RedisRulesTests(_Rules, TestCase):
    """On the suite's real Redis; each store has a bus (a connection) of its own."""

    @inlineCallbacks
    def make(self, clock: Clock) -> Any:
        if not hasattr(self, "redis"):
            self.redis = shared_server()
            self.redis.flush()
        bus = yield started_bus(self, url=self.redis.url)
        return RedisHeartbeatStore(bus, clock), bus

    def break_bus(self) -> None:
        self.redis.command("RENAME", "ckpt.alarm", "ckpt.alarm.kept")  # (an error reply when there is none)
        self.redis.command("SET", "ckpt.alarm", "not a stream")  # XADD fails; the scripts still run

    def mend_bus(self) -> None:
        self.redis.command("DEL", "ckpt.alarm")
        self.redis.command("RENAME", "ckpt.alarm.kept", "ckpt.alarm")

    @inlineCallbacks
    def test_the_redis_names(self):
        yield self.heartbeats.beat("backup", 10)
        self.assertIn("ckpt.heartbeat.backup", self.redis.command("KEYS", "ckpt.heartbeat*"))
        self.assertEqual("1) \"backup\"", self.redis.command("ZRANGE", "ckpt.heartbeats", "0", "-1").strip())
        self.assertIn(deadline_text(START + 10).rstrip("0").rstrip("."),
                      self.redis.command("ZSCORE", "ckpt.heartbeats.due", "backup"))
        yield self.advance(11)
        # late and alarmed: nothing due until the next beat
        self.assertEqual("(empty array)", self.redis.command("ZRANGE", "ckpt.heartbeats.due", "0", "-1").strip())
        self.assertIn(guid("backup", START + 10, START), self.redis.command("HGET", "ckpt.heartbeat.backup", "fired"))


# ---------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------

TOKEN = "hb-token"


def heartbeat_api(store: Any = None, bus: Any = None, clock: Any = None,
                  **api: Any) -> tuple[Heartbeats, Api, StubTreq]:
    """An Api with the heartbeat routes (and the Sentry ones, whose check-ins beat), its token TOKEN."""
    clock = clock or Clock()
    bus = bus if bus is not None else MemoryBus(clock=clock)
    heartbeats = Heartbeats(store if store is not None else MemoryHeartbeatStore(clock), bus, clock)
    cfg = config.from_dict({"api": {"tokens": [TOKEN], **api},
                            "sentry": {"keys": [SENTRY_KEY], "projects": {"7": "shop"}}})
    app = Api(cfg, bus, clock=clock)
    app.include(HeartbeatsApi(heartbeats))
    app.include(SentryApi(cfg, bus, None, clock, heartbeats=heartbeats))
    return heartbeats, app, StubTreq(app.app.resource())


AUTH = {"Authorization": [f"Bearer {TOKEN}"]}


@inlineCallbacks
def answer(client: StubTreq, method: str, path: str, body: Any = None, headers: Any = AUTH, data: Any = None):
    """``(status, JSON reply)`` of one request to ``client``."""
    sent = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        sent.setdefault("Content-Type", ["application/json"])
    response = yield client.request(method, "http://cockpit.test" + path, data=data, headers=sent)
    text = yield response.text()
    return response.code, json.loads(text)


class RouteTests(TestCase):
    timeout = 20

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.heartbeats, self.api, self.client = heartbeat_api(clock=self.clock)

    @inlineCallbacks
    def test_a_beat_is_200_with_the_heartbeat_and_keeps_its_timeout(self):
        code, reply = yield answer(self.client, "POST", "/api/heartbeats/nightly-backup.db_1")
        self.assertEqual((200, {"name": "nightly-backup.db_1", "timeout": 300.0, "last_beat": START, "state": "ok",
                                "late_since": None}), (code, reply))
        code, reply = yield answer(self.client, "POST", "/api/heartbeats/nightly-backup.db_1", {"timeout": 5})
        self.assertEqual((200, 5.0), (code, reply["timeout"]))
        self.clock.advance(10)
        code, page = yield answer(self.client, "GET", "/api/heartbeats")
        self.assertEqual((200, {"heartbeats": [{"name": "nightly-backup.db_1", "timeout": 5.0, "last_beat": START,
                                                "state": "late", "late_since": START + 5}], "next": None}),
                         (code, page))

    @inlineCallbacks
    def test_the_list_pages_by_name(self):
        for name in ("b", "a", "c"):
            yield answer(self.client, "POST", f"/api/heartbeats/{name}")
        code, page = yield answer(self.client, "GET", "/api/heartbeats?limit=2")
        self.assertEqual((200, ["a", "b"], "b"), (code, [beat["name"] for beat in page["heartbeats"]], page["next"]))
        code, page = yield answer(self.client, "GET", f"/api/heartbeats?limit=2&before={page['next']}")
        self.assertEqual((["c"], None), ([beat["name"] for beat in page["heartbeats"]], page["next"]))

    @inlineCallbacks
    def test_a_bad_name_or_timeout_is_400_saying_why_and_beats_nothing(self):
        for path, body, expected in (
                ("/api/heartbeats/a!b", None, "a heartbeat's name is 1 to 100 letters"),
                ("/api/heartbeats/" + "x" * 101, None, "a heartbeat's name is 1 to 100 letters"),
                ("/api/heartbeats/%C3%A9t%C3%A9", None, "a heartbeat's name is 1 to 100 letters"),
                ("/api/heartbeats/ok", {"timeout": 0}, "timeout"),
                ("/api/heartbeats/ok", {"timeout": MAX_TIMEOUT + 1}, "timeout"),
                ("/api/heartbeats/ok", {"timeout": "soon"}, "timeout"),
                ("/api/heartbeats/ok", {"every": 5}, "every"),
                ("/api/heartbeats/ok", [5], "invalid body")):
            code, reply = yield answer(self.client, "POST", path, body)
            self.assertEqual(400, code, (path, body, reply))
            self.assertIn(expected, reply["error"], (path, body))
        code, reply = yield answer(self.client, "POST", "/api/heartbeats/ok", data=b"{not json")
        self.assertEqual(400, code, reply)
        code, reply = yield answer(self.client, "GET", "/api/heartbeats?before=a!b")
        self.assertEqual(400, code, reply)
        self.assertEqual([], (yield answer(self.client, "GET", "/api/heartbeats"))[1]["heartbeats"])

    @inlineCallbacks
    def test_without_the_bearer_token_it_is_401(self):
        for method, path in (("POST", "/api/heartbeats/backup"), ("GET", "/api/heartbeats")):
            code, reply = yield answer(self.client, method, path, headers={})
            self.assertEqual(401, code, reply)
        self.assertEqual([], (yield self.heartbeats.page(10, None))[0])

    @inlineCallbacks
    def test_with_the_store_away_a_beat_and_the_list_are_503(self):
        bus = RedisBus(RedisSection(url=f"redis://127.0.0.1:{free_port()}/0"), reactor=reactor)  # never started: nobody there
        _, _, client = heartbeat_api(RedisHeartbeatStore(bus, self.clock), bus, self.clock)
        for method, path in (("POST", "/api/heartbeats/backup"), ("GET", "/api/heartbeats")):
            code, reply = yield answer(client, method, path)
            self.assertEqual(503, code, reply)
            self.assertIn("the bus cannot take it now", reply["error"])

    def test_the_document_is_valid_with_the_heartbeat_routes(self):
        doc = self.api.openapi()
        OpenAPIV31SpecValidator(doc).validate()
        OpenAPIV30SpecValidator(downgrade_to_30(doc)).validate()
        beat = doc["paths"]["/api/heartbeats/{name}"]["post"]
        self.assertEqual((["heartbeats"], [{"bearer": []}]), (beat["tags"], beat["security"]))
        self.assertEqual({"200", "400", "401", "408", "413", "415", "503"}, set(beat["responses"]))
        self.assertFalse(beat["requestBody"].get("required", False))
        self.assertEqual({"$ref": "#/components/schemas/Heartbeat"},
                         beat["responses"]["200"]["content"]["application/json"]["schema"])
        listing = doc["paths"]["/api/heartbeats"]["get"]
        self.assertEqual({"$ref": "#/components/schemas/HeartbeatList"},
                         listing["responses"]["200"]["content"]["application/json"]["schema"])


# ---------------------------------------------------------------------------
# Sentry check-ins
# ---------------------------------------------------------------------------

SENTRY_KEY = "0123456789abcdef0123456789abcdef"
SENTRY_AUTH = {"X-Sentry-Auth": [f"Sentry sentry_key={SENTRY_KEY}, sentry_version=7"],
               "Content-Type": ["application/x-sentry-envelope"]}


def check_in_envelope(*check_ins: dict) -> bytes:
    lines = [b'{"sent_at": "2024-05-01T12:00:00Z"}']
    for check_in in check_ins:
        payload = json.dumps(check_in).encode()
        lines += [json.dumps({"type": "check_in", "length": len(payload)}).encode(), payload]
    return b"\n".join(lines) + b"\n"


class CheckInTests(TestCase):
    timeout = 20

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.heartbeats, _, self.client = heartbeat_api(clock=self.clock)

    def post(self, *check_ins: dict):
        return answer(self.client, "POST", "/sentry/api/7/envelope/", headers=SENTRY_AUTH,
                      data=check_in_envelope(*check_ins))

    @inlineCallbacks
    def alarms(self):
        found = yield self.heartbeats.bus.recent("alarm", 100)
        return [event for _, event in reversed(found)]

    def test_an_interval_schedule_and_its_margin_make_the_timeout(self):
        interval = {"type": "interval", "value": 5, "unit": "minute"}
        self.assertEqual(420.0, check_in_timeout({"schedule": interval, "checkin_margin": 2}))
        self.assertEqual(360.0, check_in_timeout({"schedule": interval}))  # Sentry's default margin: 1 minute
        self.assertEqual(2 * 86400 + 60.0, check_in_timeout({"schedule": {"type": "interval", "value": 2,
                                                                          "unit": "day"}}))
        for other in (None, [], {"schedule": {"type": "crontab", "value": "0 * * * *"}},
                      {"schedule": {"type": "interval", "value": 5, "unit": "fortnight"}},
                      {"schedule": {"type": "interval", "value": True, "unit": "minute"}},
                      {"schedule": {"type": "interval", "value": 10 ** 400, "unit": "minute"}}):
            self.assertIsNone(check_in_timeout(other), other)

    @inlineCallbacks
    def test_a_check_in_beats_the_heartbeat_its_monitor_names(self):
        monitor = {"schedule": {"type": "interval", "value": 1, "unit": "hour"}, "checkin_margin": 5}
        code, reply = yield self.post({"check_in_id": "a" * 32, "monitor_slug": "nightly", "status": "in_progress",
                                       "monitor_config": monitor}, {"check_in_id": "b" * 32, "status": "ok"})
        self.assertEqual((200, {"id": None}), (code, reply))
        [beat], _ = yield self.heartbeats.page(10, None)  # the one with no monitor beats nothing
        self.assertEqual(("nightly", 3900.0, "ok"), (beat["name"], beat["timeout"], beat["state"]))

    @inlineCallbacks
    def test_a_check_in_error_fires_at_once_and_the_next_ok_resolves(self):
        code, _ = yield self.post({"check_in_id": "a" * 32, "monitor_slug": "nightly", "status": "error"})
        self.assertEqual(200, code)
        [alarm] = yield self.alarms()
        self.assertEqual(("firing", "heartbeat!nightly", "heartbeat:nightly"),
                         (alarm.status, alarm.service, alarm.fingerprint))
        yield self.post({"check_in_id": "c" * 32, "monitor_slug": "nightly", "status": "ok"})
        self.assertEqual(["firing", "resolved"], [alarm.status for alarm in (yield self.alarms())])

    @inlineCallbacks
    def test_a_check_in_that_is_not_one_is_400_and_beats_nothing(self):
        for check_in, expected in (({"monitor_slug": "a b", "status": "ok"}, "monitor_slug is 1 to 100"),
                                   ({"monitor_slug": 7, "status": "ok"}, "monitor_slug is 1 to 100"),
                                   ({"monitor_slug": "nightly", "status": "missed"}, "status is in_progress, ok"),
                                   ({"monitor_slug": "nightly"}, "status is in_progress, ok")):
            code, reply = yield self.post(check_in)
            self.assertEqual(400, code, check_in)
            self.assertIn(expected, reply["error"])
            self.assertIn("envelope item 1 (check_in)", reply["error"])
        self.assertEqual([], (yield self.heartbeats.page(10, None))[0])


# ---------------------------------------------------------------------------
# Real cockpits, real time
# ---------------------------------------------------------------------------

@inlineCallbacks
def heartbeat_alarms(cockpit: Cockpit):
    """The heartbeat alarms a cockpit's bus holds, oldest first."""
    code, page = yield call("GET", f"{cockpit.api}/events?type=alarm&limit=1000")
    assert code == 200, (code, page)
    return [event for event in reversed(page["events"]) if event["source"] == "heartbeat"]


@inlineCallbacks
def heartbeat_health(*cockpits: Cockpit):
    """What each cockpit's /api/health says of its heartbeats."""
    found = []
    for cockpit in cockpits:
        code, health = yield call("GET", f"{cockpit.api}/health")
        found.append(health["services"]["heartbeats"])
    return found


class RealCockpitTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_a_silent_heartbeat_fires_after_its_timeout_and_the_next_beat_resolves_its_group(self):
        cockpit = yield spawn_cockpit(self).started()  # the embedded backend
        beat_at = reactor.seconds()
        code, reply = yield call("POST", f"{cockpit.api}/heartbeats/backup", {"timeout": 5})
        self.assertEqual((200, "ok", 5.0), (code, reply["state"], reply["timeout"]), reply)
        [alarm] = yield eventually(lambda: heartbeat_alarms(cockpit), timeout=15, interval=0.1,
                                   what="the heartbeat's alarm")
        late = reactor.seconds() - beat_at
        self.assertTrue(4.5 <= late <= 8, f"the alarm came {late:.2f} s after the beat")
        self.assertEqual(("firing", "heartbeat!backup", "heartbeat", "no heartbeat for 5 s", "critical"),
                         (alarm["status"], alarm["service"], alarm["method"], alarm["msg"], alarm["severity"]))
        code, page = yield call("GET", f"{cockpit.api}/heartbeats")
        self.assertEqual("late", page["heartbeats"][0]["state"])
        code, reply = yield call("POST", f"{cockpit.api}/heartbeats/backup", {})  # the timeout it has
        self.assertEqual((200, "ok", 5.0), (code, reply.get("state"), reply.get("timeout")), reply)
        self.assertEqual(["firing", "resolved"], [a["status"] for a in (yield heartbeat_alarms(cockpit))])

        @inlineCallbacks
        def resolved_group():
            code, page = yield call("GET", f"{cockpit.api}/alarms")
            groups = [group for group in page["alarms"] if group["service"] == "heartbeat!backup"]
            return groups if groups and groups[0]["state"] == "resolved" else None

        [group] = yield eventually(resolved_group, timeout=20, what="the alarm group resolved")
        self.assertEqual(("heartbeat", 1), (group["method"], group["count"]))

    @inlineCallbacks
    def test_two_cockpits_on_one_redis_publish_each_alarm_once(self):
        redis = shared_server()
        redis.flush()
        extra = f'[redis]\nurl = "{redis.url}"\n'
        cockpits = yield defer.gatherResults([spawn_cockpit(self, extra=extra).started() for _ in range(2)])
        names = [f"job{n}" for n in range(10)]
        for n, name in enumerate(names):
            code, _ = yield call("POST", f"{cockpits[n % 2].api}/heartbeats/{name}", {"timeout": 1})
            self.assertEqual(200, code)

        @inlineCallbacks
        def all_fired():
            alarms = yield heartbeat_alarms(cockpits[0])
            return alarms if len(alarms) >= len(names) else None

        yield eventually(all_fired, timeout=20, interval=0.2, what="an alarm for each heartbeat")
        # both go on looking at the deadlines a few times more: still one alarm each
        seen = [health["checks"] for health in (yield heartbeat_health(*cockpits))]

        @inlineCallbacks
        def both_looked_again():
            now = [health["checks"] for health in (yield heartbeat_health(*cockpits))]
            return all(after >= before + 3 for before, after in zip(seen, now))

        yield eventually(both_looked_again, timeout=20, what="three more looks by each cockpit")
        alarms = yield heartbeat_alarms(cockpits[1])
        self.assertEqual(sorted(f"heartbeat!{name}" for name in names), sorted(a["service"] for a in alarms))
        self.assertEqual(len(names), len({alarm["guid"] for alarm in alarms}))
        fired = [health["fired"] for health in (yield heartbeat_health(*cockpits))]
        self.assertEqual(len(names), sum(fired), fired)


CHECK_IN_APP = '''
import sys

import sentry_sdk
from sentry_sdk.crons import capture_checkin

dsn, status = sys.argv[1], sys.argv[2]
sentry_sdk.init(dsn=dsn, default_integrations=False, send_client_reports=False)
capture_checkin(monitor_slug="backup", status=status,
                monitor_config={"schedule": {"type": "interval", "value": 5, "unit": "minute"}, "checkin_margin": 1})
sentry_sdk.flush(timeout=20)
'''


class SdkCheckInTests(TestCase):
    """sentry-sdk's ``capture_checkin``, unmodified, in a process of its own, against ``twistd cockpit``."""

    timeout = 90

    @inlineCallbacks
    def setUp(self):
        try:
            import sentry_sdk.crons
        except ImportError:
            self.fail("sentry-sdk is not installed: pip install '.[test]'")
        self.assertTrue(sentry_sdk.crons.capture_checkin)
        self.cockpit = yield spawn_cockpit(self, extra=f'[sentry]\nkeys = ["{SENTRY_KEY}"]\n').started()
        self.app = os.path.join(self.cockpit.data, "job.py")
        with open(self.app, "w") as handle:
            handle.write(CHECK_IN_APP)

    @inlineCallbacks
    def check_in(self, status: str):
        host = self.cockpit.api.removeprefix("http://").removesuffix("/api")
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [self.app, f"http://{SENTRY_KEY}@{host}/sentry/7", status],
            env={**os.environ, "SENTRY_DSN": ""}, path=self.cockpit.data, reactor=reactor)
        self.assertEqual(0, code, (out + err).decode(errors="replace"))

    @inlineCallbacks
    def test_capture_checkin_beats_the_heartbeat_and_an_error_fires_at_once(self):
        yield self.check_in("in_progress")
        yield self.check_in("ok")
        code, page = yield call("GET", f"{self.cockpit.api}/heartbeats")
        [beat] = page["heartbeats"]
        self.assertEqual(("backup", "ok", 360.0), (beat["name"], beat["state"], beat["timeout"]))
        yield self.check_in("error")
        # the SDK flushed: its envelope was answered, once the alarm was on the bus
        [alarm] = yield heartbeat_alarms(self.cockpit)
        self.assertEqual(("firing", "heartbeat!backup", "the check-in reported an error"),
                         (alarm["status"], alarm["service"], alarm["msg"]))
        yield self.check_in("ok")
        self.assertEqual(["firing", "resolved"], [a["status"] for a in (yield heartbeat_alarms(self.cockpit))])
        self.assertEqual(4, (yield call("GET", f"{self.cockpit.api}/health"))[1]["services"]["sentry"]["check_ins"])
