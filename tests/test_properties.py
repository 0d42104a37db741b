"""Property-based tests: whatever comes in gets a clean refusal, or an event that reads back equal.

The examples are bounded and derived from a fixed seed, so CI runs the same cases every
time; ``HYPOTHESIS_PROFILE=explore`` runs many more, freshly random ones.
"""
from __future__ import annotations

import json
import os
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from cockpit import decode, events, hrd
from cockpit import repos as model
from cockpit.decode import DecodeError
from cockpit.events import EVENT_TYPES, EventError

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# text with everything in it: control characters, lone surrogates, astral characters
any_text = st.text(st.characters(codec=None), max_size=40)
keys = st.one_of(any_text, st.sampled_from(["type", "guid", "epoch", "source", "args", "tags", "service",
                                            "msg", "io", "action", "from", "to", "line_nbr", "occurence"]))
scalars = st.one_of(
    st.none(), st.booleans(), any_text,
    st.integers(), st.integers(min_value=-(10 ** 4299), max_value=10 ** 4299),
    st.floats(allow_nan=True, allow_infinity=True),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


def event_data() -> st.SearchStrategy:
    """Objects shaped like events, with field values of every kind."""
    base = st.fixed_dictionaries({}, optional={
        "type": st.one_of(st.sampled_from(EVENT_TYPES), any_text),
        "guid": st.one_of(st.uuids().map(str), any_text),
        "epoch": st.one_of(st.integers(), values),
        "source": any_text,
        "args": st.dictionaries(keys, values, max_size=4),
        "tags": st.lists(any_text, max_size=3),
        "service": st.one_of(st.just("node!web1"), any_text),
        "msg": values,
        "io": st.sampled_from(["input", "output"]),
        "action": any_text,
        "line_nbr": values,
        "to": st.one_of(any_text, st.lists(any_text, max_size=2)),
    })
    return st.one_of(base, st.dictionaries(keys, values, max_size=5))


def reads_back_equal(test: TestCase, event: events.Event) -> None:
    again = events.from_stored(event.to_json())
    test.assertEqual(event, again)
    test.assertEqual(event.to_dict(), json.loads(event.to_json()))


class EventProperties(TestCase):
    @given(event_data(), st.one_of(st.none(), st.sampled_from(EVENT_TYPES)))
    def test_any_data_is_refused_cleanly_or_reads_back_equal(self, data, endpoint):
        try:
            event = events.from_data(data, endpoint)
        except EventError as exc:
            self.assertTrue(str(exc))
            return
        reads_back_equal(self, event)

    @given(event_data(), st.sampled_from(EVENT_TYPES))
    def test_any_json_body_is_refused_cleanly_or_reads_back_equal(self, data, endpoint):
        raw = json.dumps(data, allow_nan=True)  # NaN and lone surrogates (escaped) included
        try:
            event = events.from_json(raw.encode(), endpoint)
        except EventError as exc:
            self.assertTrue(str(exc))
            return
        reads_back_equal(self, event)

    @given(event_data(), st.sampled_from(EVENT_TYPES))
    def test_any_yaml_body_is_refused_cleanly_or_reads_back_equal(self, data, endpoint):
        try:
            raw = yaml.safe_dump(data, allow_unicode=False)
        except (yaml.YAMLError, UnicodeError):  # what PyYAML cannot write, no client sends
            return
        try:
            event = events.from_yaml(raw, endpoint)
        except EventError as exc:
            self.assertTrue(str(exc))
            return
        reads_back_equal(self, event)

    @given(st.binary(max_size=200), st.sampled_from(EVENT_TYPES))
    def test_any_bytes_are_refused_cleanly_or_read_back_equal(self, raw, endpoint):
        for parse in (events.from_json, events.from_yaml):
            try:
                event = parse(raw, endpoint)
            except EventError as exc:
                self.assertTrue(str(exc))
                continue
            reads_back_equal(self, event)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=25)


class LoaderProperties(TestCase):
    @given(json_values)
    def test_json_data_decodes_as_the_standard_library_reads_it(self, data):
        raw = json.dumps(data)
        self.assertEqual(json.loads(raw), decode.decode_json(raw))

    @given(json_values)
    def test_yaml_written_by_pyyaml_decodes_as_pyyaml_reads_it(self, data):
        raw = yaml.safe_dump(data)
        self.assertEqual(yaml.safe_load(raw), decode.decode_yaml(raw))

    @given(json_values, st.integers(min_value=1, max_value=5))
    def test_shared_nodes_decode_to_what_they_stand_for(self, data, copies):
        shared = [data]
        raw = yaml.safe_dump({"a": shared, "b": [shared] * copies})  # PyYAML writes anchors and aliases
        self.assertEqual(yaml.safe_load(raw), decode.decode_yaml(raw))

    @given(st.text(st.characters(codec="utf-8"), max_size=300))
    def test_any_text_is_refused_cleanly_or_is_data_that_reads_back(self, text):
        for parse in (decode.decode_yaml, decode.decode_json):
            try:
                data = parse(text)
            except DecodeError as exc:
                self.assertTrue(str(exc))
                continue
            decode.check(data)
            self.assertEqual(data, json.loads(json.dumps(data)))

    @given(st.lists(st.sampled_from(["a: ", "&x ", "*x", "[", "]", "{", "}", ", ", "\n", "- ", "<<: ", "  ",
                                     "b", "&y ", "*y", "!!set ", "? ", "1", "2001-13-45", "0x1F", "1:30"]),
                    max_size=40))
    def test_alias_soup_is_refused_cleanly_or_is_data(self, parts):
        text = "".join(parts)
        try:
            data = decode.decode_yaml(text)
        except DecodeError as exc:
            self.assertTrue(str(exc))
            return
        decode.check(data)


hrd_text = st.lists(st.one_of(
    st.sampled_from(["events.email =", "events.alarm = a, b", "recurring.x = 5m", "    notify,", "\tb,",
                     "port = type:int default:22 required", "name = type:str default:'web 1'", "# c", "",
                     "x = 'unclosed", "tags = type:list default:'a,b'", "f = type:float default:1e400",
                     "n = type:int default:" + "9" * 5000, "= y", "k.k = \"q\" , 'r'"]),
    st.text(string.printable, max_size=30)), max_size=12).map("\n".join)


class HrdProperties(TestCase):
    @given(hrd_text)
    def test_any_hrd_is_refused_with_an_hrd_error_or_parsed(self, text):
        for read in (hrd.parse, hrd.service_spec, hrd.schema):
            try:
                read(text)
            except hrd.HrdError as exc:
                self.assertTrue(str(exc))


blueprint_args = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), json_values, max_size=4)


class BlueprintProperties(TestCase):
    @given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9]{0,6}__[a-z0-9][a-z0-9_-]{0,6}", fullmatch=True),
                           blueprint_args, max_size=5))
    def test_a_blueprint_written_as_yaml_gives_its_blocks_in_order(self, blocks):
        text = yaml.safe_dump(blocks, sort_keys=False) if blocks else "{}"
        try:
            entries = model.parse_blueprint(text)
        except model.Invalid as exc:
            self.assertFalse(blocks, str(exc))  # only the empty one is refused
            return
        self.assertEqual(list(blocks), [f"{e.template}__{e.instance}" for e in entries])
        self.assertEqual([yaml.safe_load(yaml.safe_dump(a)) for a in blocks.values()], [e.args for e in entries])

    @given(st.text(max_size=300))
    def test_any_blueprint_text_is_refused_with_invalid_or_parsed(self, text):
        try:
            entries = model.parse_blueprint(text)
        except model.Invalid as exc:
            self.assertTrue(str(exc))
            return
        for entry in entries:
            json.dumps(entry.args, allow_nan=False)
