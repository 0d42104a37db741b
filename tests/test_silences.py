"""Silences (docs/design.md §11): the store on Redis and in memory, matching, and the REST calls."""
from __future__ import annotations

import json

import treq
from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.embedded.groups import MemoryGroupStore
from cockpit.bus import BusUnavailable
from cockpit.events import AlarmEvent, EcoEvent
from cockpit.openapi import downgrade_to_30
from cockpit.silences import KEEP_EXPIRED, NewSilence, Silence, SilencesApi, matches
from cockpit.web import Api
from tests.cockpits import spawn_cockpit
from tests.redis_server import RedisServer, bus_on_shared_server, shared_server, started_bus
from tests.wiring import backend_for, started

T0 = 1_800_000_000.0
WEB = {"service": "node!web*"}


def new(matchers=None, **fields) -> NewSilence:
    fields.setdefault("duration", 3600)
    return NewSilence(matchers=matchers or WEB, **fields)


class StoreBehaviour:
    """What every silence store does; ``make_bus`` gives the bus whose backend makes the store."""

    def make_bus(self):
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.bus = yield started(self, self.make_bus())
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = backend_for(self.bus).silences(self.clock)

    @inlineCallbacks
    def ids(self, d: Deferred):
        return [s["id"] for s in (yield d)]

    @inlineCallbacks
    def test_add_makes_an_id_starts_now_and_is_listed_active(self):
        silence = yield self.store.add(new(comment="kernel upgrade"), T0)
        self.assertRegex(silence["id"], "^[0-9a-f]{32}$")
        self.assertEqual({"matchers": WEB, "starts": T0, "ends": T0 + 3600, "comment": "kernel upgrade",
                          "created_by": "api", "state": "active"},
                         {k: v for k, v in silence.items() if k != "id"})
        Silence.model_validate(silence)
        self.assertEqual([silence], (yield self.store.list(T0)))

    @inlineCallbacks
    def test_ends_may_be_given_instead_of_a_duration_and_starts_later(self):
        silence = yield self.store.add(new(starts=T0 + 100, ends=T0 + 200, duration=None, created_by="ops"), T0)
        self.assertEqual((T0 + 100, T0 + 200, "ops"), (silence["starts"], silence["ends"], silence["created_by"]))

    @inlineCallbacks
    def test_a_silence_is_pending_then_active_then_expired(self):
        silence = yield self.store.add(new(starts=T0 + 100, duration=100), T0)
        self.assertEqual("pending", silence["state"])
        states = []
        for at in (T0 + 99, T0 + 100, T0 + 199.5, T0 + 200, T0 + 300):
            states.append([s["state"] for s in (yield self.store.list(at))])
        self.assertEqual([["pending"], ["active"], ["active"], ["expired"], ["expired"]], states)

    @inlineCallbacks
    def test_active_holds_what_is_in_force_from_its_start_until_before_its_end(self):
        now = yield self.store.add(new(duration=100), T0)
        later = yield self.store.add(new(starts=T0 + 50, duration=100), T0)
        seen = {}
        for at in (T0, T0 + 49, T0 + 50, T0 + 99, T0 + 100, T0 + 149, T0 + 150):
            seen[at - T0] = sorted((yield self.ids(self.store.active(at))))
        self.assertEqual({0: [now["id"]], 49: [now["id"]], 50: sorted([now["id"], later["id"]]),
                          99: sorted([now["id"], later["id"]]), 100: [later["id"]], 149: [later["id"]], 150: []},
                         seen)
        self.assertEqual(["active"], [s["state"] for s in (yield self.store.active(T0))])

    @inlineCallbacks
    def test_the_list_is_the_latest_to_start_first(self):
        first = yield self.store.add(new(), T0)
        last = yield self.store.add(new(starts=T0 + 500), T0)
        middle = yield self.store.add(new(starts=T0 + 200), T0)
        self.assertEqual([last["id"], middle["id"], first["id"]], (yield self.ids(self.store.list(T0))))

    @inlineCallbacks
    def test_expire_ends_an_active_silence_now_and_keeps_it_listed(self):
        silence = yield self.store.add(new(), T0)
        expired = yield self.store.expire(silence["id"], T0 + 10)
        self.assertEqual({**silence, "ends": T0 + 10, "state": "expired"}, expired)
        self.assertEqual([expired], (yield self.store.list(T0 + 10)))
        self.assertEqual([], (yield self.store.active(T0 + 10)))

    @inlineCallbacks
    def test_expiring_what_ended_already_changes_nothing_and_an_unknown_id_is_none(self):
        silence = yield self.store.add(new(duration=60), T0)
        again = yield self.store.expire(silence["id"], T0 + 100)
        self.assertEqual((T0 + 60, "expired"), (again["ends"], again["state"]))
        self.assertIsNone((yield self.store.expire("0" * 32, T0)))

    @inlineCallbacks
    def test_claim_ended_hands_out_each_ended_silence_once(self):
        short = yield self.store.add(new(duration=100), T0)
        long = yield self.store.add(new(duration=200), T0)
        self.assertEqual([], (yield self.store.claim_ended(T0 + 99)))
        claimed = yield self.store.claim_ended(T0 + 100)  # at its end: ended
        self.assertEqual([{**short, "state": "expired"}], claimed)
        self.assertEqual([], (yield self.store.claim_ended(T0 + 150)))
        self.assertEqual([long["id"]], (yield self.ids(self.store.claim_ended(T0 + 1000))))
        self.assertEqual([], (yield self.store.claim_ended(T0 + 2000)))
        self.assertEqual(2, len((yield self.store.list(T0 + 2000))))  # claimed, still listed

    @inlineCallbacks
    def test_an_expired_silence_is_claimed_once_at_its_new_end(self):
        silence = yield self.store.add(new(), T0)
        yield self.store.expire(silence["id"], T0 + 10)
        self.assertEqual([], (yield self.store.claim_ended(T0 + 9)))
        self.assertEqual([silence["id"]], (yield self.ids(self.store.claim_ended(T0 + 10))))
        yield self.store.expire(silence["id"], T0 + 20)
        self.assertEqual([], (yield self.store.claim_ended(T0 + 30)))

    @inlineCallbacks
    def test_a_pending_silence_expired_never_starts_and_is_never_claimed(self):
        silence = yield self.store.add(new(starts=T0 + 100), T0)
        expired = yield self.store.expire(silence["id"], T0 + 10)
        self.assertEqual((T0 + 10, T0 + 10, "expired"), (expired["starts"], expired["ends"], expired["state"]))
        self.assertEqual([], (yield self.store.active(T0 + 150)))
        self.assertEqual([], (yield self.store.claim_ended(T0 + 5000)))
        self.assertEqual([silence["id"]], (yield self.ids(self.store.list(T0 + 5000))))

    @inlineCallbacks
    def test_an_expired_silence_is_removed_seven_days_after_its_end(self):
        claimed = yield self.store.add(new(duration=100), T0)
        unclaimed = yield self.store.add(new(duration=200), T0)
        expired = yield self.store.add(new(starts=T0 + 50), T0)
        yield self.store.expire(expired["id"], T0 + 10)
        yield self.store.claim_ended(T0 + 100)
        kept = yield self.ids(self.store.list(T0 + 10 + KEEP_EXPIRED))
        self.assertEqual(sorted([claimed["id"], unclaimed["id"], expired["id"]]), sorted(kept))
        self.assertEqual([unclaimed["id"]], (yield self.ids(self.store.list(T0 + 100.5 + KEEP_EXPIRED))))
        self.assertEqual([], (yield self.store.list(T0 + 200.5 + KEEP_EXPIRED)))
        self.assertEqual([], (yield self.store.claim_ended(T0 + 300 + KEEP_EXPIRED)))

    @inlineCallbacks
    def test_claiming_removes_what_ended_more_than_seven_days_ago(self):
        old = yield self.store.add(new(duration=100), T0)
        self.assertEqual([old["id"]], (yield self.ids(self.store.claim_ended(T0 + 100))))
        yield self.store.claim_ended(T0 + 101 + KEEP_EXPIRED)
        self.assertIsNone((yield self.store.expire(old["id"], T0 + 102 + KEEP_EXPIRED)))

    @inlineCallbacks
    def test_a_silence_may_last_a_year_to_the_second(self):
        silence = yield self.store.add(new(starts=T0 + 0.3, duration=365 * 86400), T0)
        self.assertEqual(T0 + 0.3 + 365 * 86400, silence["ends"])

    @inlineCallbacks
    def test_times_that_make_no_window_are_refused_with_a_sentence(self):
        for silence, words in ((new(starts=T0 + 100, ends=T0 + 100, duration=None), "ends: must be after starts"),
                               (new(ends=T0 - 1, duration=None), "ends: must be after starts"),
                               (new(starts=T0 - 100, ends=T0, duration=None), "ends: must be in the future"),
                               (new(starts=T0, ends=T0 + 366 * 86400, duration=None), "at most a year"),
                               (new(starts=32503680000.0 - 10, duration=3600), "before the year 3000")):
            failure = yield self.assertFailure(self.store.add(silence, T0), ValueError)
            self.assertIn(words, str(failure))
        self.assertEqual([], (yield self.store.list(T0)))


class MemoryStoreTests(StoreBehaviour, TestCase):
    def make_bus(self):
        return MemoryBus(clock=reactor)


class RedisStoreTests(StoreBehaviour, TestCase):
    timeout = 20

    def make_bus(self):
        self.redis, bus = bus_on_shared_server()
        return bus

    @inlineCallbacks
    def other_store(self):
        """A store on a bus of its own, on the same Redis: another process's view."""
        bus = yield started_bus(self, url=self.redis.url)
        return backend_for(bus).silences(self.clock)

    @inlineCallbacks
    def test_two_stores_on_two_buses_claiming_at_once_get_each_end_exactly_once(self):
        other = yield self.other_store()
        added = yield defer.gatherResults([self.store.add(new(duration=10 + n), T0) for n in range(40)])
        claims = []
        for n, at in enumerate((T0 + 15, T0 + 30, T0 + 45, T0 + 60)):
            stores = (self.store, other) if n % 2 else (other, self.store)  # each goes first in turn
            rounds = yield defer.gatherResults([store.claim_ended(at) for store in stores for _ in range(3)])
            claims += [s["id"] for claimed in rounds for s in claimed]
        self.assertEqual(sorted(s["id"] for s in added), sorted(claims))  # every one, none twice

    @inlineCallbacks
    def test_a_silence_made_by_one_process_is_in_force_in_another(self):
        other = yield self.other_store()
        silence = yield self.store.add(new(), T0)
        self.assertEqual([silence], (yield other.active(T0)))
        yield other.expire(silence["id"], T0 + 1)
        self.assertEqual([], (yield self.store.active(T0 + 1)))

    @inlineCallbacks
    def test_an_expire_that_meets_a_concurrent_one_keeps_the_first_end(self):
        other = yield self.other_store()
        silence = yield self.store.add(new(), T0)
        execute = self.bus.execute

        def racing(*args):
            d = execute(*args)
            if args[0] != "HGET":
                return d
            self.bus.execute = execute  # once: between this read and its write, the other process expires it
            return d.addCallback(lambda raw: other.expire(silence["id"], T0 + 5).addCallback(lambda _: raw))

        self.bus.execute = racing
        expired = yield self.store.expire(silence["id"], T0 + 10)
        self.assertEqual((T0 + 5, "expired"), (expired["ends"], expired["state"]))
        self.assertEqual([T0 + 5], [s["ends"] for s in (yield self.store.claim_ended(T0 + 10))])
        self.assertEqual([], (yield other.claim_ended(T0 + 10)))

    @inlineCallbacks
    def test_the_keys_are_the_documented_ones_and_are_emptied_by_the_cleanup(self):
        silence = yield self.store.add(new(duration=100), T0)
        self.assertIn(silence["id"], self.redis.command("HKEYS", "ckpt.silences"))
        self.assertIn(silence["id"], self.redis.command("ZRANGE", "ckpt.silences.ends", "0", "-1"))
        self.assertEqual(silence, {**json.loads(json.loads(self.redis.command("HGET", "ckpt.silences",
                                                                              silence["id"]))), "state": "active"})
        yield self.store.claim_ended(T0 + 100)
        self.assertEqual("(integer) 0", self.redis.command("ZCARD", "ckpt.silences.ends").strip())
        self.assertIn(silence["id"], self.redis.command("ZRANGE", "ckpt.silences.ended", "0", "-1"))
        yield self.store.list(T0 + 101 + KEEP_EXPIRED)
        self.assertEqual("(empty array)", self.redis.command("KEYS", "ckpt.silences*").strip())

    @inlineCallbacks
    def test_the_scripts_are_loaded_again_when_redis_lost_them(self):
        silence = yield self.store.add(new(), T0)
        self.assertEqual([silence], (yield self.store.active(T0)))
        self.redis.command("SCRIPT", "FLUSH")
        self.assertEqual([silence], (yield self.store.active(T0)))


class RedisDownTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_with_redis_away_the_store_fails_with_bus_unavailable_and_the_api_answers_503(self):
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        bus = yield started_bus(self, url=server.url, timeout=2.0)
        store = backend_for(bus).silences(reactor)
        client = Client(self, store)
        server.stop()
        yield bus.when_disconnected()
        yield self.assertFailure(store.add(new(), T0), BusUnavailable)
        for method, path, body in (("POST", "/api/silences", {"matchers": WEB, "duration": 60}),
                                   ("GET", "/api/silences", None), ("DELETE", f"/api/silences/{'a' * 32}", None)):
            code, reply = yield client.call(method, path, body)
            self.assertEqual(503, code, (method, reply))
            self.assertIn("the bus cannot take it now", reply["error"])


class MatchTests(TestCase):
    ALARM = {"id": "ab" * 16, "service": "node!web1", "method": "HighLoad", "severity": "critical",
             "labels": {"team": "ops", "env": "prod"}}

    def test_a_glob_matches_a_field_case_sensitively(self):
        self.assertTrue(matches({"service": "node!web*"}, self.ALARM))
        self.assertTrue(matches({"service": "node!web?", "method": "High[LM]oad"}, self.ALARM))
        self.assertFalse(matches({"service": "node!db*"}, self.ALARM))
        self.assertFalse(matches({"method": "highload"}, self.ALARM))

    def test_every_matcher_must_match(self):
        self.assertTrue(matches({"service": "node!*", "severity": "crit*", "team": "ops"}, self.ALARM))
        self.assertFalse(matches({"service": "node!*", "severity": "warning"}, self.ALARM))

    def test_another_name_is_a_label(self):
        self.assertTrue(matches({"env": "prod"}, self.ALARM))
        self.assertFalse(matches({"env": "staging"}, self.ALARM))
        # a field is the group's own, never a label of that name
        self.assertFalse(matches({"service": "x"}, {**self.ALARM, "labels": {"service": "x"}}))

    def test_id_silences_exactly_one_group(self):
        self.assertTrue(matches({"id": "ab" * 16}, self.ALARM))
        self.assertFalse(matches({"id": "ab" * 16}, {**self.ALARM, "id": "cd" * 16}))

    def test_a_missing_field_or_label_matches_only_star(self):
        eco = {"id": "cd" * 16, "app_name": "shop", "eco_type": "KeyError"}
        self.assertFalse(matches({"severity": "*crit*"}, eco))
        self.assertFalse(matches({"team": "?*"}, eco))
        self.assertFalse(matches({"team": "ops"}, {**eco, "labels": None}))
        self.assertTrue(matches({"severity": "*", "team": "*", "app_name": "sh*"}, eco))
        self.assertTrue(matches({"severity": "*"}, {**eco, "severity": ""}))
        self.assertFalse(matches({"severity": "?*"}, {**eco, "severity": ""}))

    @inlineCallbacks
    def test_the_groups_the_store_keeps_match_by_their_fields_and_labels(self):
        groups = MemoryGroupStore(Clock())
        yield groups.record(AlarmEvent(service="node!web1", method="HighLoad", msg="load", severity="warning",
                                       labels={"team": "ops"}))
        yield groups.record(EcoEvent(app_name="shop", eco_type="KeyError", error_msg="no order"))
        alarm = (yield groups.page("alarm", 10, None))[0][0]
        eco = (yield groups.page("eco", 10, None))[0][0]
        self.assertTrue(matches({"service": "node!web*", "severity": "warning", "team": "ops"}, alarm))
        self.assertTrue(matches({"app_name": "shop", "eco_type": "Key*"}, eco))
        self.assertTrue(matches({"id": eco["id"]}, eco))
        self.assertFalse(matches({"id": eco["id"]}, alarm))


class Client:
    """Real HTTP against an Api serving ``store`` (and a Clock at T0), with a Bearer token."""

    token = "s3cret"

    def __init__(self, test: TestCase, store, clock=None):
        self.clock = clock if clock is not None else store.clock
        self.api = Api(config.from_dict({"api": {"tokens": [self.token]}}), MemoryBus(clock=reactor), clock=reactor)
        self.api.include(SilencesApi(store, self.clock))
        port = reactor.listenTCP(0, self.api.site(reactor), interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def call(self, method: str, path: str, body=None, raw: bytes = b"", token: str = token):
        headers = {"Authorization": [f"Bearer {token}"]} if token else {}
        if body is not None or raw:
            raw = raw or json.dumps(body).encode()
            headers["Content-Type"] = ["application/json"]
        response = yield treq.request(method, self.base + path, data=raw or None, headers=headers,
                                      persistent=False)
        return response.code, json.loads((yield response.text()))


class RestBehaviour:
    def make_store(self):
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.store = yield self.make_store()
        self.client = Client(self, self.store)

    @inlineCallbacks
    def test_create_list_and_expire_over_http(self):
        code, made = yield self.client.call("POST", "/api/silences",
                                            {"matchers": {"service": "node!web*", "team": "ops"}, "duration": 3600,
                                             "comment": "kernel upgrade", "created_by": "ops"})
        self.assertEqual(201, code, made)
        Silence.model_validate(made)
        self.assertEqual(({"service": "node!web*", "team": "ops"}, T0, T0 + 3600, "active", "ops"),
                         (made["matchers"], made["starts"], made["ends"], made["state"], made["created_by"]))
        code, listed = yield self.client.call("GET", "/api/silences")
        self.assertEqual((200, {"silences": [made]}), (code, listed))
        self.clock.advance(60)
        code, expired = yield self.client.call("DELETE", f"/api/silences/{made['id']}")
        self.assertEqual((200, {**made, "ends": T0 + 60, "state": "expired"}), (code, expired))
        code, listed = yield self.client.call("GET", "/api/silences")
        self.assertEqual([expired], listed["silences"])

    @inlineCallbacks
    def test_an_unknown_silence_is_a_404_with_a_sentence(self):
        for id in ("0" * 32, "not-an-id"):
            code, reply = yield self.client.call("DELETE", f"/api/silences/{id}")
            self.assertEqual(404, code)
            self.assertIn("no silence", reply["error"])

    @inlineCallbacks
    def test_a_bad_silence_is_a_400_naming_the_field(self):
        m = {"matchers": WEB}
        cases = [
            ({"duration": 60}, "matchers: field required"),
            ({"matchers": {}, "duration": 60}, "matchers: give 1 to 20 matchers"),
            ({"matchers": {f"k{n}": "x" for n in range(21)}, "duration": 60}, "matchers: give 1 to 20 matchers"),
            ({"matchers": {"bad key": "x"}, "duration": 60}, "matchers: 'bad key' is not a field or label name"),
            ({"matchers": {"9lives": "x"}, "duration": 60}, "matchers: '9lives' is not a field or label name"),
            ({"matchers": {"service": ""}, "duration": 60}, "matchers.service: a glob is text of 1 to 200"),
            ({"matchers": {"service": "x" * 201}, "duration": 60}, "matchers.service: a glob is text of 1 to 200"),
            ({"matchers": {"service": 3}, "duration": 60}, "matchers.service: a glob is text"),
            (m, "ends or duration: one of them is required"),
            ({**m, "duration": 60, "ends": T0 + 60}, "give either ends or duration"),
            ({**m, "duration": -5}, "duration: "),
            ({**m, "duration": 366 * 86400}, "duration: "),
            ({**m, "ends": "soon"}, "ends: "),
            ({**m, "ends": T0 - 10}, "ends: must be after starts"),
            ({**m, "starts": T0 - 100, "ends": T0 - 10}, "ends: must be in the future"),
            ({**m, "starts": T0, "ends": T0 + 400 * 86400}, "ends: a silence lasts at most a year"),
            ({**m, "duration": 60, "comment": "x" * 1001}, "comment: "),
            ({**m, "duration": 60, "created_by": ""}, "created_by: "),
            ({**m, "duration": 60, "by": "me"}, "by: unknown field"),
            ([1, 2], "the body must be a JSON object"),
        ]
        for body, words in cases:
            code, reply = yield self.client.call("POST", "/api/silences", body)
            self.assertEqual(400, code, (body, reply))
            self.assertTrue(reply["error"].startswith("invalid silence: "), reply)
            self.assertIn(words, reply["error"], body)
        for raw in (b'{"matchers": ', b'{"matchers": {"a": "b"}, "duration": NaN}'):
            code, reply = yield self.client.call("POST", "/api/silences", raw=raw)
            self.assertEqual(400, code, reply)
            self.assertIn("invalid silence", reply["error"])
        self.assertEqual([], (yield self.store.list(T0)))

    @inlineCallbacks
    def test_every_call_needs_the_bearer_token(self):
        for method, path in (("GET", "/api/silences"), ("POST", "/api/silences"),
                             ("DELETE", f"/api/silences/{'0' * 32}")):
            code, reply = yield self.client.call(method, path, token="")
            self.assertEqual(401, code, (method, path))
            code, reply = yield self.client.call(method, path, {"matchers": WEB, "duration": 1}, token="wrong")
            self.assertEqual(401, code, (method, path))


class MemoryRestTests(RestBehaviour, TestCase):
    def make_store(self):
        self.clock = Clock()
        self.clock.advance(T0)
        return defer.succeed(backend_for(MemoryBus(clock=reactor)).silences(self.clock))


class RedisRestTests(RestBehaviour, TestCase):
    timeout = 20

    @inlineCallbacks
    def make_store(self):
        redis = shared_server()
        redis.flush()
        bus = yield started_bus(self, url=redis.url)
        self.clock = Clock()
        self.clock.advance(T0)
        return backend_for(bus).silences(self.clock)


class DocumentTests(TestCase):
    def test_the_routes_are_documented_in_valid_openapi_3_1_and_3_0(self):
        clock = Clock()
        api = Api(config.from_dict({}), MemoryBus(clock=clock), clock=clock)
        api.include(SilencesApi(backend_for(MemoryBus(clock=clock)).silences(clock), clock))
        doc = api.openapi()
        OpenAPIV31SpecValidator(doc).validate()
        OpenAPIV30SpecValidator(downgrade_to_30(doc)).validate()
        paths = doc["paths"]
        self.assertEqual({"get", "post"}, set(paths["/api/silences"]))
        self.assertEqual({"delete"}, set(paths["/api/silences/{id}"]))
        self.assertEqual(["silences"], paths["/api/silences"]["post"]["tags"])
        self.assertIn("404", paths["/api/silences/{id}"]["delete"]["responses"])
        for op in (paths["/api/silences"]["get"], paths["/api/silences"]["post"], paths["/api/silences/{id}"]["delete"]):
            self.assertIn("503", op["responses"])


class ProcessTests(TestCase):
    """Two ``twistd cockpit`` processes on one Redis see the same silences (docs/design.md §9)."""

    timeout = 60

    @inlineCallbacks
    def test_a_silence_made_on_one_cockpit_is_listed_and_expired_on_another(self):
        redis = shared_server()
        redis.flush()
        extra = f'[redis]\nurl = "{redis.url}"\n'
        token = 'tokens = ["s3cret"]'
        one, two = yield defer.gatherResults([spawn_cockpit(self, extra=extra, api=token).started(),
                                              spawn_cockpit(self, extra=extra, api=token).started()])
        auth = {"Authorization": ["Bearer s3cret"]}

        @inlineCallbacks
        def call(method, url, body=None):
            response = yield treq.request(method, url, json=body, headers=auth, persistent=False)
            return response.code, (yield response.json())

        code, made = yield call("POST", f"{one.api}/silences", {"matchers": WEB, "duration": 3600})
        self.assertEqual(201, code, made)
        code, listed = yield call("GET", f"{two.api}/silences")
        self.assertEqual((200, [made["id"]]), (code, [s["id"] for s in listed["silences"]]))
        code, expired = yield call("DELETE", f"{two.api}/silences/{made['id']}")
        self.assertEqual((200, "expired"), (code, expired["state"]))
        code, listed = yield call("GET", f"{one.api}/silences")
        self.assertEqual(["expired"], [s["state"] for s in listed["silences"]])
        self.assertEqual([0, 0], (yield defer.gatherResults([one.stop(), two.stop()])))
