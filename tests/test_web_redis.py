"""The REST API publishing into a real Redis: channels and streams, 503 when it is away, shared groups."""
from __future__ import annotations

import json
import json as _json

import txredisapi
import treq
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from cockpit import config
from cockpit.backends.redis import RedisBus
from cockpit.config import RedisSection
from cockpit.examples import SEED_YAML
from cockpit.groups import EventGroups
from cockpit.web import Api
from tests.redis_server import RedisServer, bus_on_shared_server, shared_server, started_bus
from tests.arrivals import Arrivals
from tests.wiring import backend_for, started


@inlineCallbacks
def handled_between(total: int, *consumers):
    """Fires once the consumers have handled ``total`` entries between them."""
    while sum(c.handled for c in consumers) < total:
        waits = [c.when_handled(c.handled + 1) for c in consumers]
        yield defer.DeferredList(waits, fireOnOneCallback=True, consumeErrors=True)
        for wait in waits:
            wait.cancel()


class Client:
    """treq against an Api on a loopback port (StubTreq only completes synchronous answers)."""

    def __init__(self, test: TestCase, api: Api):
        port = reactor.listenTCP(0, api.site(reactor), interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def get(self, path: str) -> Deferred:
        return treq.get(self.base + path.removeprefix("http://cockpit"), persistent=False)

    def post(self, path: str, data: bytes = b"", headers=None, json=None) -> Deferred:
        if json is not None:
            data, headers = _json.dumps(json).encode(), {"Content-Type": ["application/json"]}
        return treq.post(self.base + path.removeprefix("http://cockpit"), data, headers=headers,
                         persistent=False)


def post(client: Client, event_type: str, body, content_type: str = "application/json") -> Deferred:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return client.post(f"http://cockpit/api/events/{event_type}", data=data,
                       headers={"Content-Type": [content_type]})


class RedisPublishTests(TestCase):
    timeout = 20

    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()
        self.bus = RedisBus(RedisSection(url=self.redis.url), reactor=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.client = Client(self, Api(config.from_dict({}), self.bus, clock=reactor))
        return self.bus.when_connected()

    @inlineCallbacks
    def watch(self, *channels: str):
        messages = Arrivals()

        class Watcher(txredisapi.SubscriberProtocol):
            def messageReceived(self, pattern, channel, message):
                messages.append((channel, json.loads(message)))

        factory = txredisapi.SubscriberFactory(isLazy=True)
        factory.protocol = Watcher
        factory.convertNumbers = False
        factory.startConnecting(TCP4ClientEndpoint(reactor, "127.0.0.1", self.redis.port))
        self.addCleanup(factory.disconnect)
        watcher = yield factory.deferred
        yield watcher.subscribe(list(channels))
        return messages

    @inlineCallbacks
    def test_every_type_in_json_and_yaml_goes_to_its_channel_and_stream(self):
        import yaml

        types = ["email", "telegram", "alarm", "eco", "generic"]
        messages = yield self.watch(*[f"ckpt.{t}" for t in types])
        sent = []
        for event_type in types:
            example = (next(iter(SEED_YAML[event_type].values())) if event_type in SEED_YAML
                       else "tags: [deploy]\nargs: {app: shop}\n")
            for body, kind in ((yaml.safe_load(example), "application/json"), (example, "application/yaml")):
                if isinstance(body, dict):
                    body.pop("guid", None)  # the eco seed carries its own guid: make the two differ
                response = yield post(self.client, event_type, body, kind)
                payload = yield response.json()
                self.assertEqual(202, response.code, (event_type, kind, payload))
                sent.append((f"ckpt.{event_type}", payload["guid"]))
        yield messages.when(len(sent))
        self.assertEqual(sorted(sent), sorted((channel, m["guid"]) for channel, m in messages))
        for event_type in types:
            stream = self.redis.command("XRANGE", f"ckpt.{event_type}", "-", "+")
            for channel, guid in sent:
                if channel == f"ckpt.{event_type}":
                    self.assertIn(guid, stream)


class RedisDownTests(TestCase):
    timeout = 20

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.bus = RedisBus(RedisSection(url=self.redis.url, timeout=2.0), reactor=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.client = Client(self, Api(config.from_dict({}), self.bus, clock=reactor))
        return self.bus.when_connected()

    @inlineCallbacks
    def test_publish_is_503_while_redis_is_stopped_and_202_after(self):
        self.redis.stop()
        yield self.bus.when_disconnected()
        response = yield post(self.client, "alarm", {"service": "node!n1"})
        payload = yield response.json()
        self.assertEqual(503, response.code)
        self.assertIn("not reachable", payload["error"])
        self.assertEqual([b"5"], response.headers.getRawHeaders(b"Retry-After"))
        health = yield self.client.get("http://cockpit/api/health")
        self.assertEqual(503, health.code)
        self.assertEqual("degraded", (yield health.json())["status"])
        listing = yield self.client.get("http://cockpit/api/events")
        self.assertEqual(503, listing.code)
        yield listing.json()
        self.redis.start()
        yield self.bus.when_connected()
        response = yield post(self.client, "alarm", {"service": "node!n1"})
        self.assertEqual(202, response.code)
        yield response.json()


class GithubRedisTests(TestCase):
    """GitHub deliveries on a real Redis: published once across processes, and never lost to a mark."""

    timeout = 20

    def setUp(self):
        self.redis = shared_server()
        self.redis.flush()
        self.buses = []
        self.clients = []
        for _ in range(2):  # two cockpits on one Redis
            bus = RedisBus(RedisSection(url=self.redis.url), reactor=reactor)
            bus.startService()
            self.addCleanup(bus.stopService)
            self.buses.append(bus)
            self.clients.append(Client(self, Api(config.from_dict({"api": {"github_secret": "s"}}), bus, clock=reactor)))
        return defer.gatherResults([bus.when_connected() for bus in self.buses])

    @inlineCallbacks
    def deliver(self, client: Client, delivery: str = "d-1"):
        import hashlib
        import hmac

        body = b'{"ref": "refs/heads/main"}'
        signature = "sha256=" + hmac.new(b"s", body, hashlib.sha256).hexdigest()
        response = yield client.post("http://cockpit/api/webhooks/github", data=body, headers={
            "Content-Type": ["application/json"], "X-GitHub-Event": ["push"], "X-GitHub-Delivery": [delivery],
            "X-Hub-Signature-256": [signature]})
        return response.code, (yield response.json())

    @inlineCallbacks
    def test_a_delivery_is_published_once_whichever_cockpit_it_reaches(self):
        first = yield self.deliver(self.clients[0])
        again = yield self.deliver(self.clients[1])
        self.assertEqual(202, first[0])
        self.assertEqual((200, {"guid": first[1]["guid"], "event": "push", "duplicate": True}), again)
        self.assertEqual(1, self.redis.command("XRANGE", "ckpt.generic", "-", "+").count(first[1]["guid"]))
        ttl = int(self.redis.command("TTL", "ckpt.github.delivery.d-1").split()[-1])
        self.assertTrue(86000 < ttl <= 86400, ttl)

    @inlineCallbacks
    def test_a_delivery_whose_publish_failed_is_not_marked_and_its_redelivery_is_published(self):
        self.redis.command("SET", "ckpt.generic", "not a stream")  # XADD fails; GET and SET still work
        code, payload = yield self.deliver(self.clients[0])
        self.assertEqual(503, code)
        self.assertIn("Redis refused the event", payload["error"])
        self.assertEqual("(nil)", self.redis.command("GET", "ckpt.github.delivery.d-1").strip())
        self.redis.command("DEL", "ckpt.generic")
        code, payload = yield self.deliver(self.clients[1])  # GitHub's redelivery
        self.assertEqual(202, code)
        self.assertIn(payload["guid"], self.redis.command("XRANGE", "ckpt.generic", "-", "+"))


class GroupsBehaviour:
    """Eco and alarm grouping through the API, for both group stores."""

    def make_bus(self):
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.bus = yield started(self, self.make_bus())
        self.groups = EventGroups(self.bus, backend_for(self.bus).group_store(reactor), reactor, drain_timeout=0)
        self.groups.startService()
        self.addCleanup(self.groups.stopService)
        self.api = Api(config.from_dict({}), self.bus, groups=self.groups, clock=reactor)
        self.client = Client(self, self.api)

    @inlineCallbacks
    def publish_all(self, *items):
        counted = self.groups.consumer.handled + len(items)
        for event_type, body in items:
            response = yield post(self.client, event_type, body)
            self.assertEqual(202, response.code)
            yield response.json()
        yield self.groups.consumer.when_handled(counted)

    @inlineCallbacks
    def get(self, path: str):
        response = yield self.client.get(f"http://cockpit{path}")
        return response.code, (yield response.json())

    @inlineCallbacks
    def test_repeated_eco_raises_occurence_in_one_group(self):
        eco = {"app_name": "shop", "eco_type": "BUG", "error_msg": "boom", "func_name": "pay", "line_nbr": 3}
        yield self.publish_all(("eco", {**eco, "epoch": 100}), ("eco", {**eco, "epoch": 200, "occurence": 2}),
                               ("eco", {**eco, "error_msg": "other", "epoch": 150}))
        code, page = yield self.get("/api/ecos")
        self.assertEqual(200, code)
        [repeated, other] = page["ecos"]
        # a repeat leaves the group NEW: ALERT means that it was notified
        self.assertEqual(("boom", 3, 100, 200, "NEW"), (repeated["error_msg"], repeated["occurence"],
                                                          repeated["first_time"], repeated["last_time"],
                                                          repeated["state"]))
        self.assertEqual(("other", 1, "NEW"), (other["error_msg"], other["occurence"], other["state"]))
        self.assertEqual(repeated["id"], repeated["fingerprint"])

    @inlineCallbacks
    def test_closing_eco_closes_its_group(self):
        eco = {"app_name": "shop", "error_msg": "boom"}
        yield self.publish_all(("eco", {**eco, "epoch": 100}), ("eco", {**eco, "epoch": 110, "state": "CLOSED"}))
        _, page = yield self.get("/api/ecos")
        self.assertEqual(["CLOSED"], [g["state"] for g in page["ecos"]])

    @inlineCallbacks
    def test_alarms_group_by_service_and_method_with_latest_message(self):
        yield self.publish_all(("alarm", {"service": "node!a", "method": "disk", "msg": "90%", "epoch": 10}),
                               ("alarm", {"service": "node!a", "method": "disk", "msg": "95%", "epoch": 20}),
                               ("alarm", {"service": "node!b", "method": "disk", "msg": "50%", "epoch": 15}))
        code, page = yield self.get("/api/alarms")
        self.assertEqual(200, code)
        self.assertEqual([("node!a", "95%", 2, 10, 20), ("node!b", "50%", 1, 15, 15)],
                         [(g["service"], g["msg"], g["count"], g["first_time"], g["last_time"])
                          for g in page["alarms"]])

    @inlineCallbacks
    def test_groups_page_with_next_even_on_equal_times(self):
        yield self.publish_all(*[("alarm", {"service": f"node!n{n}", "epoch": 10 + n // 2}) for n in range(7)])
        seen, before = [], ""
        while True:
            code, page = yield self.get(f"/api/alarms?limit=2{before}")
            self.assertEqual(200, code)
            seen += [g["service"] for g in page["alarms"]]
            if page["next"] is None:
                break
            before = f"&before={page['next']}"
        self.assertEqual(7, len(set(seen)))
        self.assertEqual(7, len(seen))
        self.assertEqual(["node!n6"], seen[:1])

    @inlineCallbacks
    def test_fifty_identical_ecos_posted_at_once_make_one_group_of_fifty(self):
        eco = {"app_name": "shop", "eco_type": "KeyError", "func_name": "pay", "line_nbr": 7}
        counted = self.groups.consumer.handled + 50
        responses = yield defer.gatherResults([post(self.client, "eco", {**eco, "error_msg": f"order {n} lost"})
                                               for n in range(50)])
        self.assertEqual([202] * 50, [r.code for r in responses])
        yield defer.gatherResults([r.json() for r in responses])
        yield self.groups.consumer.when_handled(counted)
        code, page = yield self.get("/api/ecos")
        self.assertEqual((200, [50]), (code, [g["occurence"] for g in page["ecos"]]))

    @inlineCallbacks
    def test_one_group_its_samples_and_its_lifecycle_over_http(self):
        yield self.publish_all(("alarm", {"service": "node!a", "method": "disk", "msg": "full"}))
        _, page = yield self.get("/api/alarms")
        group_id = page["alarms"][0]["id"]
        code, group = yield self.get(f"/api/alarms/{group_id}")
        self.assertEqual((200, "firing", ["full"]), (code, group["state"], [s["msg"] for s in group["samples"]]))
        response = yield self.client.post(f"http://cockpit/api/alarms/{group_id}/ack", json={"by": "alice"})
        acked = yield response.json()
        self.assertEqual((200, "alice"), (response.code, acked["acked"]["by"]))
        response = yield self.client.post(f"http://cockpit/api/alarms/{group_id}/close")
        self.assertEqual((200, "closed"), (response.code, (yield response.json())["state"]))
        code, page = yield self.get("/api/alarms?state=closed")
        self.assertEqual((200, [group_id]), (code, [g["id"] for g in page["alarms"]]))
        code, page = yield self.get("/api/alarms?state=firing&sort=count")
        self.assertEqual((200, []), (code, page["alarms"]))

    @inlineCallbacks
    def test_unknown_groups_actions_and_filters_get_a_sentence(self):
        for path, status, words in (("/api/ecos/" + "0" * 32, 404, "no eco group"),
                                    ("/api/ecos/nothex", 404, "32 hex digits"),
                                    ("/api/alarms?state=NEW", 400, "state"),
                                    ("/api/ecos?sort=size", 400, "sort")):
            code, reply = yield self.get(path)
            self.assertEqual(status, code, path)
            self.assertIn(words, reply["error"])
        response = yield self.client.post(f"http://cockpit/api/ecos/{'0' * 32}/snooze")
        self.assertEqual(404, response.code)
        self.assertIn("ack, close or reopen", (yield response.json())["error"])
        response = yield self.client.post(f"http://cockpit/api/ecos/{'0' * 32}/ack", json={"who": "x"})
        self.assertEqual(400, response.code)

    @inlineCallbacks
    def test_malformed_before_is_400(self):
        code, page = yield self.get("/api/ecos?before=yesterday")
        self.assertEqual(400, code)
        self.assertIn("before", page["error"])


class MemoryGroupsTests(GroupsBehaviour, TestCase):
    def make_bus(self):
        from cockpit.backends.embedded import MemoryBus

        return MemoryBus(clock=reactor)


class RedisGroupsTests(GroupsBehaviour, TestCase):
    timeout = 20

    def make_bus(self):
        self.redis, bus = bus_on_shared_server()
        return bus

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.groups.consumer.block_ms = 100

    @inlineCallbacks
    def test_two_processes_count_each_event_once(self):
        # a second cockpit on the same Redis: its own bus, its own groups service
        other_bus = yield started_bus(self, url=self.redis.url)
        other = EventGroups(other_bus, backend_for(other_bus).group_store(reactor), reactor, drain_timeout=0)
        other.consumer.block_ms = 100
        other.startService()
        self.addCleanup(other.stopService)
        for n in range(40):
            response = yield post(self.client, "alarm", {"service": "node!a", "method": "disk", "msg": str(n)})
            yield response.json()
        yield handled_between(40, self.groups.consumer, other.consumer)
        _, page = yield self.get("/api/alarms")
        self.assertEqual([40], [g["count"] for g in page["alarms"]])
        other_view = yield other.alarms()
        self.assertEqual(page["alarms"], other_view[0])

    @inlineCallbacks
    def test_a_redelivered_event_counts_once(self):
        from cockpit.events import AlarmEvent

        event = AlarmEvent(service="node!a", method="disk")
        self.assertTrue((yield self.groups.store.record(event)))
        self.assertFalse((yield self.groups.store.record(event)))
        groups, _ = yield self.groups.alarms()
        self.assertEqual([1], [g["count"] for g in groups])
