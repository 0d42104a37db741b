"""The group lifecycle (docs/design.md §10), the same for the Redis store and the embedded one."""
from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit.backends.embedded import MemoryBus
from cockpit.events import AlarmEvent, EcoEvent
from cockpit.groups import EventGroups
from tests.redis_server import bus_on_shared_server
from tests.wiring import backend_for, started

ECO = {"app_name": "shop", "eco_type": "KeyError", "func_filename": "pay.py", "func_name": "charge",
       "line_nbr": 41, "error_msg": "order 1234 not found"}
FIRING = {"service": "node!web1", "method": "HighLoad", "msg": "load is high", "fingerprint": "f00d"}


class StoreBehaviour:
    """What every group store does; ``make_bus`` gives the bus whose backend makes the store."""

    samples = 3

    def make_bus(self):
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.bus = yield started(self, self.make_bus())
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = backend_for(self.bus).group_store(self.clock, self.samples)

    def record(self, *events):
        return defer.gatherResults([self.store.record(e) for e in events])

    @inlineCallbacks
    def only(self, kind, **filters):
        groups, _ = yield self.store.page(kind, 100, None, **filters)
        self.assertEqual(1, len(groups), groups)
        return (yield self.store.get(kind, groups[0]["id"]))

    @inlineCallbacks
    def test_fifty_identical_ecos_at_once_make_one_group_of_fifty(self):
        counted = yield self.record(*[EcoEvent(**ECO, epoch=100 + n) for n in range(50)])
        self.assertEqual([True] * 50, counted)
        group = yield self.only("eco")
        self.assertEqual((50, 100, 149, "NEW"), (group["occurence"], group["first_time"], group["last_time"],
                                                 group["state"]))

    @inlineCallbacks
    def test_a_number_in_the_message_does_not_split_a_group_but_another_line_does(self):
        yield self.record(EcoEvent(**ECO), EcoEvent(**{**ECO, "error_msg": "order 98 not found"}),
                          EcoEvent(**{**ECO, "line_nbr": 42}))
        groups, _ = yield self.store.page("eco", 10, None, sort="occurence")
        self.assertEqual([2, 1], [g["occurence"] for g in groups])
        self.assertEqual([41, 42], [g["line_nbr"] for g in groups])

    @inlineCallbacks
    def test_a_redelivered_event_counts_once(self):
        event = EcoEvent(**ECO)
        self.assertEqual([True, False], [(yield self.store.record(event)), (yield self.store.record(event))])
        self.assertEqual(1, (yield self.only("eco"))["occurence"])

    @inlineCallbacks
    def test_ack_records_who_and_when(self):
        yield self.record(EcoEvent(**ECO, epoch=100))
        group = yield self.only("eco")
        self.assertIsNone(group["acked"])
        self.clock.advance(5)
        acked = yield self.store.act("eco", group["id"], "ack", "alice")
        self.assertEqual({"by": "alice", "at": 1_800_000_005.0}, acked["acked"])
        self.assertEqual("NEW", acked["state"])
        self.assertEqual(acked["acked"], (yield self.store.get("eco", group["id"]))["acked"])

    @inlineCallbacks
    def test_a_closed_eco_reopens_on_recurrence_with_its_first_time_and_count_kept(self):
        yield self.record(EcoEvent(**ECO, epoch=100), EcoEvent(**ECO, epoch=110))
        group = yield self.only("eco")
        yield self.store.act("eco", group["id"], "ack", "alice")
        self.clock.advance(60)
        closed = yield self.store.act("eco", group["id"], "close", "bob")
        self.assertEqual(("CLOSED", 1_800_000_060.0, 1_800_000_060), (closed["state"], closed["ended_at"],
                                                                      closed["close_time"]))
        self.assertEqual([], (yield self.store.page("eco", 10, None, state="NEW"))[0])
        yield self.record(EcoEvent(**ECO, epoch=200))
        again = yield self.only("eco", state="NEW")
        self.assertEqual((100, 200, 3, 1, None, None), (again["first_time"], again["last_time"], again["occurence"],
                                                        again["reopened"], again["acked"], again["ended_at"]))
        self.assertEqual([], (yield self.store.page("eco", 10, None, state="CLOSED"))[0])

    @inlineCallbacks
    def test_an_eco_that_reports_itself_closed_or_alerted_sets_the_state(self):
        yield self.record(EcoEvent(**ECO, epoch=100))
        yield self.record(EcoEvent(**ECO, epoch=101, state="ALERT"))
        self.assertEqual("ALERT", (yield self.only("eco"))["state"])
        yield self.record(EcoEvent(**ECO, epoch=102, state="CLOSED"))
        self.assertEqual("CLOSED", (yield self.only("eco"))["state"])

    @inlineCallbacks
    def test_reopen_and_close_by_hand_and_unknown_groups(self):
        yield self.record(AlarmEvent(**FIRING, epoch=100))
        group = yield self.only("alarm")
        self.assertEqual("closed", (yield self.store.act("alarm", group["id"], "close", "bob"))["state"])
        reopened = yield self.store.act("alarm", group["id"], "reopen", "bob")
        self.assertEqual(("firing", 1), (reopened["state"], reopened["reopened"]))
        self.assertIsNone((yield self.store.act("alarm", "0" * 32, "ack", "bob")))
        self.assertIsNone((yield self.store.get("alarm", "0" * 32)))

    @inlineCallbacks
    def test_alarms_group_by_fingerprint_and_resolve(self):
        yield self.record(AlarmEvent(**FIRING, epoch=100, severity="critical"),
                          AlarmEvent(**{**FIRING, "msg": "load is still high"}, epoch=160))
        firing = yield self.only("alarm")
        self.assertEqual(("firing", 2, "load is still high", ""),  # the latest alarm's fields
                         (firing["state"], firing["count"], firing["msg"], firing["severity"]))
        yield self.record(AlarmEvent(**FIRING, epoch=300, status="resolved"))
        resolved = yield self.only("alarm")
        self.assertEqual(("resolved", 2, 300, "resolved"), (resolved["state"], resolved["count"],
                                                           resolved["last_time"], resolved["status"]))
        self.assertEqual(resolved["id"], (yield self.only("alarm", state="resolved"))["id"])

    @inlineCallbacks
    def test_a_late_resolve_or_an_old_firing_copy_changes_nothing(self):
        yield self.record(AlarmEvent(**FIRING, epoch=100))
        yield self.record(AlarmEvent(**FIRING, epoch=300))
        yield self.record(AlarmEvent(**FIRING, epoch=200, status="resolved"))  # an earlier episode's end
        self.assertEqual("firing", (yield self.only("alarm"))["state"])
        yield self.record(AlarmEvent(**FIRING, epoch=400, status="resolved"))
        yield self.record(AlarmEvent(**FIRING, epoch=300))  # Alertmanager repeating the old firing
        still = yield self.only("alarm")
        self.assertEqual(("resolved", 0), (still["state"], still["reopened"]))
        yield self.record(AlarmEvent(**FIRING, epoch=500))  # a new episode
        self.assertEqual(("firing", 1), ((yield self.only("alarm"))["state"], (yield self.only("alarm"))["reopened"]))

    @inlineCallbacks
    def test_a_group_closed_by_hand_stays_closed_for_repeats_of_what_it_saw(self):
        yield self.record(AlarmEvent(**FIRING, epoch=100))
        group = yield self.only("alarm")
        yield self.store.act("alarm", group["id"], "close", "bob")
        yield self.record(AlarmEvent(**FIRING, epoch=100))
        self.assertEqual(("closed", 2), ((yield self.only("alarm"))["state"], (yield self.only("alarm"))["count"]))
        yield self.record(AlarmEvent(**FIRING, epoch=101))
        self.assertEqual("firing", (yield self.only("alarm"))["state"])

    @inlineCallbacks
    def test_alarms_without_a_fingerprint_group_by_service_method_and_masked_message(self):
        plain = {"service": "node!a", "method": "disk"}
        yield self.record(AlarmEvent(**plain, msg="91% full"), AlarmEvent(**plain, msg="93% full"),
                          AlarmEvent(**plain, msg="unreadable"), AlarmEvent(**{**plain, "method": "cpu"}, msg="91% full"))
        groups, _ = yield self.store.page("alarm", 10, None, sort="count")
        self.assertEqual([2, 1, 1], [g["count"] for g in groups])

    @inlineCallbacks
    def test_a_group_keeps_its_latest_samples_newest_first(self):
        yield self.record(*[EcoEvent(**ECO, epoch=100 + n) for n in range(5)])
        group = yield self.only("eco")
        self.assertEqual(5, group["occurence"])
        self.assertEqual(self.samples, len(group["samples"]))
        self.assertEqual(sorted((s["epoch"] for s in group["samples"]), reverse=True),
                         [s["epoch"] for s in group["samples"]])
        self.assertEqual({"type": "eco", "func_name": "charge"},
                         {k: group["samples"][0][k] for k in ("type", "func_name")})

    @inlineCallbacks
    def test_lists_filter_by_state_and_sort_by_count_across_pages(self):
        for n in range(6):  # group n has n + 1 occurrences, and the later n, the earlier its last time
            yield self.record(*[AlarmEvent(service=f"node!n{n}", method="m", epoch=1000 - n) for _ in range(n + 1)])
        groups, _ = yield self.store.page("alarm", 100, None)
        yield self.store.act("alarm", groups[0]["id"], "close", "bob")  # n0, the latest
        seen, before = [], None
        while True:
            page, before = yield self.store.page("alarm", 2, before, state="firing", sort="count")
            seen += [(g["service"], g["count"]) for g in page]
            if before is None:
                break
        self.assertEqual([(f"node!n{n}", n + 1) for n in range(5, 0, -1)], seen)
        by_time, _ = yield self.store.page("alarm", 100, None, state="firing")
        self.assertEqual([f"node!n{n}" for n in range(1, 6)], [g["service"] for g in by_time])

    @inlineCallbacks
    def test_prune_removes_groups_that_ended_long_ago_and_nothing_open(self):
        yield self.record(EcoEvent(**ECO), EcoEvent(**{**ECO, "line_nbr": 1}), EcoEvent(**{**ECO, "line_nbr": 2}))
        groups, _ = yield self.store.page("eco", 10, None)
        old, recent, _open = sorted(groups, key=lambda g: g["line_nbr"])
        yield self.store.act("eco", old["id"], "close", "bob")
        self.clock.advance(1000)
        yield self.store.act("eco", recent["id"], "close", "bob")
        self.assertEqual(1, (yield self.store.prune("eco", self.clock.seconds() - 500)))
        left, _ = yield self.store.page("eco", 10, None)
        self.assertEqual(sorted([recent["id"], _open["id"]]), sorted(g["id"] for g in left))
        self.assertIsNone((yield self.store.get("eco", old["id"])))
        for state in ("CLOSED", None):
            ids = [g["id"] for g in (yield self.store.page("eco", 10, None, state=state, sort="count"))[0]]
            self.assertNotIn(old["id"], ids)

    @inlineCallbacks
    def test_the_service_prunes_what_ended_more_than_keep_days_ago_every_hour(self):
        groups = EventGroups(self.bus, self.store, self.clock, keep_days=1, drain_timeout=0)
        yield self.record(EcoEvent(**ECO))
        group = yield self.only("eco")
        yield self.store.act("eco", group["id"], "close", "bob")
        groups.startService()
        self.addCleanup(groups.stopService)
        self.assertIsNotNone((yield self.store.get("eco", group["id"])))
        self.clock.advance(86401)  # hourly: 24 prunings, the last one past keep_days
        yield groups.prune()  # Redis may not have answered the hourly one yet
        self.assertIsNone((yield self.store.get("eco", group["id"])))
        self.assertEqual(1, groups.health()["pruned"])


class MemoryStoreTests(StoreBehaviour, TestCase):
    def make_bus(self):
        return MemoryBus(clock=reactor)


class RedisStoreTests(StoreBehaviour, TestCase):
    timeout = 20

    def make_bus(self):
        self.redis, bus = bus_on_shared_server()
        return bus

    @inlineCallbacks
    def test_the_script_is_loaded_again_when_redis_lost_it(self):
        yield self.record(EcoEvent(**ECO))
        self.redis.command("SCRIPT", "FLUSH")
        yield self.record(EcoEvent(**ECO))
        self.assertEqual(2, (yield self.only("eco"))["occurence"])
