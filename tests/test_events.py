from __future__ import annotations

import json
import uuid
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import events
from cockpit.backends.embedded import MemoryBus
from cockpit.events import AlarmEvent, EcoEvent, EmailEvent, EventError

SEEDS = Path(__file__).parent / "seeds"


def seed(name: str) -> bytes:
    return (SEEDS / name).read_bytes()


class SeedExampleTests(TestCase):
    """The original documents' examples, with their lost indentation restored."""

    def test_eco(self):
        eco = events.from_yaml(seed("eco.yaml"))
        self.assertIsInstance(eco, EcoEvent)
        self.assertEqual("762d6f24-8b50-4e46-8cb6-fa6d0f56f1fd", eco.guid)
        self.assertEqual((1, 10, 239, 23, 2), (eco.gid, eco.nid, eco.pid, eco.line_nbr, eco.occurence))
        self.assertEqual("from JumpScale import j\nprint('hello world')\n", eco.code)
        self.assertEqual("list of tags here", eco.tags)

    def test_alarm(self):
        alarm = events.from_yaml(seed("alarm.yaml"))
        self.assertEqual(("myservice!instance", "monitor", 1462275396), (alarm.service, alarm.method, alarm.epoch))

    def test_telegram_examples(self):
        create = events.from_yaml(seed("telegram_repo_create.yaml"))
        self.assertEqual(("input", "repo.create", {"name": "env du-conv2"}), (create.io, create.action, create.args))
        bp = events.from_yaml(seed("telegram_bp_create.yaml"))
        self.assertEqual("here the content of the blueprint\n", bp.args["content"])
        execute = events.from_yaml(seed("telegram_service_execute.yaml"))
        self.assertEqual({"name": "node!cpu1", "action": "monitor"}, execute.args)

    def test_email(self):
        mail = events.from_yaml(seed("email.yaml"))
        self.assertEqual("kristof@incubaid.com", mail.from_)
        self.assertEqual("md", mail.bodytype)
        self.assertIn("aname.doc", mail.attachments)
        self.assertEqual("kristof@incubaid.com", json.loads(mail.to_json())["from"])


class ModelTests(TestCase):
    def test_guids_are_made_at_creation(self):
        a, b = AlarmEvent(service="a!b"), AlarmEvent(service="a!b")
        self.assertNotEqual(a.guid, b.guid)

    def test_an_event_without_epoch_is_published_at_the_second_of_the_bus_clock(self):
        clock = Clock()
        clock.advance(1_700_000_123.75)
        bus = MemoryBus(clock=clock)
        made = AlarmEvent(service="a!b")
        bus.publish(made)
        clock.advance(60)
        given = AlarmEvent(service="a!b", epoch=1_600_000_000)
        bus.publish(given)
        zero = AlarmEvent(service="a!b", epoch=0)
        bus.publish(zero)
        stored = self.successResultOf(bus.recent("alarm"))
        self.assertEqual({made.guid: 1_700_000_123, given.guid: 1_600_000_000, zero.guid: 0},
                         {event.guid: event.epoch for _, event in stored})
        self.assertEqual(1_700_000_123, made.epoch)  # the publisher sees what was published

    def test_made_guids_are_distinct_uuid4_strings(self):
        guids = [AlarmEvent(service="a!b").guid for _ in range(1000)]
        self.assertEqual(len(set(guids)), 1000)
        for guid in guids:
            parsed = uuid.UUID(guid)
            self.assertEqual((parsed.version, parsed.variant, str(parsed)), (4, uuid.RFC_4122, guid))

    def test_sender_guid_is_kept(self):
        self.assertEqual("mine", events.from_data({"type": "generic", "guid": "mine"}).guid)

    def test_json_round_trip(self):
        mail = EmailEvent(from_="a@b.c", to="ops@example.com", subject="hi")
        self.assertEqual(["ops@example.com"], mail.to)
        again = events.from_json(mail.to_json())
        self.assertEqual(mail, again)
        self.assertEqual(mail, events.from_stored(mail.to_json()))

    def test_validation_error_names_the_field_path(self):
        error = self.assertRaises(EventError, events.from_data,
                                  {"type": "telegram", "io": "sideways", "action": "x", "args": {}})
        self.assertIn("io: ", str(error))
        error = self.assertRaises(EventError, events.from_data, {"type": "email", "to": [1, "a@b"]})
        self.assertIn("to[0]", str(error))
        error = self.assertRaises(EventError, events.from_data, {"type": "alarm", "service": "nobang"})
        self.assertIn("service: expected role!instance, such as node!web1, got 'nobang'", str(error))
        error = self.assertRaises(EventError, events.from_data, {"type": "alarm", "service": "a!b", "colour": 1})
        self.assertIn("colour: unknown field", str(error))

    def test_type_must_match_the_endpoint(self):
        self.assertEqual("alarm", events.from_data({"service": "a!b"}, "alarm").type)
        error = self.assertRaises(EventError, events.from_data, {"type": "eco"}, "alarm")
        self.assertIn("'eco'", str(error))
        error = self.assertRaises(EventError, events.from_data, {}, "weather")
        self.assertIn("unknown event type 'weather'", str(error))

    def test_broken_yaml_says_where(self):
        # the seed as printed: block scalars lost their indentation
        broken = b"type: eco\ncode: |\nfrom JumpScale import j\nprint('x')\nbacktrace: |\nhere\n"
        error = self.assertRaises(EventError, events.from_yaml, broken)
        self.assertRegex(str(error), r"invalid YAML at line \d+, column \d+")

    def test_broken_json_says_where(self):
        error = self.assertRaises(EventError, events.from_json, b'{"type": "alarm",')
        self.assertRegex(str(error), r"invalid JSON at line 1, column \d+")
        error = self.assertRaises(EventError, events.from_json, b"[1, 2]")
        self.assertIn("expected an object", str(error))

    def test_event_nested_deeper_than_the_bus_can_read_back_is_refused(self):
        def nested(levels):
            value = 1
            for _ in range(levels):
                value = [value]
            return value

        # the event is one level and args another
        deepest = events.from_data({"type": "generic", "args": {"a": nested(events.MAX_DEPTH - 2)}})
        self.assertEqual(deepest.args, events.from_stored(deepest.to_json()).args)
        error = self.assertRaises(EventError, events.from_data,
                                  {"type": "generic", "args": {"a": nested(events.MAX_DEPTH - 1)}})
        self.assertEqual(f"invalid event: the event nests lists and objects deeper than {events.MAX_DEPTH} levels",
                         str(error))
        # past what the parsers themselves can take, too
        self.assertIn("deeper than", str(self.assertRaises(
            EventError, events.from_json, '{"args": {"a": ' + "[" * 5000 + "]" * 5000 + "}}", "generic")))
        self.assertIn("deeper than", str(self.assertRaises(
            EventError, events.from_yaml, "args: {a: " + "[" * 5000 + "]" * 5000 + "}", "generic")))

    def test_json_schemas_cover_every_type(self):
        schemas = events.json_schemas()
        for name in ("EmailEvent", "TelegramEvent", "AlarmEvent", "EcoEvent", "GenericEvent"):
            self.assertIn(name, schemas)
        self.assertIn("from", schemas["EmailEvent"]["properties"])
        self.assertIn("service", schemas["AlarmEvent"]["required"])

    def test_eco_fingerprint_groups_repeats(self):
        a = EcoEvent(app_name="app", func_name="f", line_nbr=3, error_msg="boom", occurence=1)
        b = EcoEvent(app_name="app", func_name="f", line_nbr=3, error_msg="boom", occurence=7)
        c = EcoEvent(app_name="app", func_name="f", line_nbr=4, error_msg="boom")
        self.assertEqual(a.fingerprint, b.fingerprint)
        self.assertNotEqual(a.fingerprint, c.fingerprint)

    def test_eco_fingerprint_masks_numbers_hex_ids_and_uuids_in_the_message(self):
        def eco(message):
            return EcoEvent(app_name="app", func_name="f", line_nbr=3, error_msg=message).fingerprint

        self.assertEqual(eco("timeout after 30 s on job 12"), eco("timeout after 4.5 s on job 907"))
        self.assertEqual(eco("no row 762d6f24-8b50-4e46-8cb6-fa6d0f56f1fd"), eco("no row 0d3c1f8e-3a5e-4c62-9d2b-5b1f3c0d7a41"))
        self.assertEqual(eco("bad pointer 0x7f3a10"), eco("bad pointer 0xdeadbeef"))
        self.assertEqual(eco("commit 3f2a9c1d8e not found"), eco("commit 9be0a47c11 not found"))
        self.assertNotEqual(eco("disk full"), eco("disk gone"))

    def test_eco_fingerprint_is_the_senders_then_its_own_guid_then_the_default(self):
        given = events.from_data({"type": "eco", "fingerprint": "mine", "guid": "g-1"})
        self.assertEqual("mine", given.fingerprint)
        by_guid = events.from_data({"type": "eco", "guid": "762d6f24-8b50-4e46-8cb6-fa6d0f56f1fd"})
        self.assertEqual("762d6f24-8b50-4e46-8cb6-fa6d0f56f1fd", by_guid.fingerprint)
        made = events.from_data({"type": "eco", "error_msg": "x"})
        self.assertEqual(made.default_fingerprint(), made.fingerprint)
        for event in (given, by_guid, made):  # what the bus hands back keeps it
            self.assertEqual(event.fingerprint, events.from_stored(event.to_json()).fingerprint)
