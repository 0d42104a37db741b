"""The HRD parser and the two template files written in it."""
from __future__ import annotations

from twisted.trial.unittest import TestCase

from cockpit import hrd
from cockpit.hrd import HrdError


class ParseTests(TestCase):
    def test_seed_continuation_block_parses_to_a_list(self):
        text = "events.email =\n    notify,\n    escalate,\n"
        self.assertEqual(hrd.parse(text), {"events.email": ["notify", "escalate"]})

    def test_tab_indented_continuation_parses_too(self):
        self.assertEqual(hrd.parse("events.email = \n\tnotify,\n\tescalate,\n"),
                         {"events.email": ["notify", "escalate"]})

    def test_continuation_lines_without_commas_are_separate_items(self):
        self.assertEqual(hrd.parse("a =\n  x\n  y\n"), {"a": ["x", "y"]})

    def test_one_line_list_and_scalars(self):
        parsed = hrd.parse("a = x, y\nb = plain text\nc = 'quoted, with comma'\nd = \"double\"\n")
        self.assertEqual(parsed, {"a": ["x", "y"], "b": "plain text", "c": "quoted, with comma", "d": "double"})

    def test_comments_and_blank_lines_are_ignored(self):
        text = "# a comment\n\na = 1  # trailing comment\n   # indented comment\nb = '#not a comment'\n"
        self.assertEqual(hrd.parse(text), {"a": "1", "b": "#not a comment"})

    def test_indented_line_without_a_key_is_an_error_naming_the_line(self):
        error = self.assertRaises(HrdError, hrd.parse, "# header\n  notify,\n")
        self.assertIn("line 2", str(error))

    def test_line_without_equals_is_an_error(self):
        error = self.assertRaises(HrdError, hrd.parse, "a = 1\njust words\n")
        self.assertIn("line 2: expected 'key = value'", str(error))

    def test_unclosed_quote_is_an_error(self):
        self.assertIn("never closed", str(self.assertRaises(HrdError, hrd.parse, "a = 'open\n")))

    def test_duplicate_key_is_an_error(self):
        error = self.assertRaises(HrdError, hrd.parse, "a = 1\na = 2\n")
        self.assertIn("line 2: a is given twice (first on line 1)", str(error))

    def test_crlf_line_endings_parse(self):
        self.assertEqual(hrd.parse("a =\r\n  x,\r\n  y,\r\n"), {"a": ["x", "y"]})


class ServiceSpecTests(TestCase):
    def test_events_give_subscriptions_with_types_lowercased(self):
        spec = hrd.service_spec("events.EMAIL =\n    notify,\n    escalate,\nevents.alarm = heal\n")
        self.assertEqual(spec.events, {"email": ("notify", "escalate"), "alarm": ("heal",)})

    def test_unknown_event_type_is_a_clear_error(self):
        error = self.assertRaises(HrdError, hrd.service_spec, "events.emai =\n\tnotify,\n")
        self.assertIn("unknown event type 'emai'", str(error))

    def test_recurring_periods_in_every_unit(self):
        spec = hrd.service_spec("recurring.a = 5s\nrecurring.b = 5m\nrecurring.c = 2h\nrecurring.d = 1d\n"
                                "recurring.e = 90\n")
        self.assertEqual(spec.recurring, {"a": 5, "b": 300, "c": 7200, "d": 86400, "e": 90})

    def test_recurring_below_five_seconds_is_refused(self):
        error = self.assertRaises(HrdError, hrd.service_spec, "recurring.monitor = 3s\n")
        self.assertIn("recurring.monitor: 3s is below the minimum period of 5s", str(error))

    def test_recurring_with_a_bad_period_is_refused(self):
        error = self.assertRaises(HrdError, hrd.service_spec, "recurring.monitor = often\n")
        self.assertIn("expected a period such as", str(error))

    def test_action_names_must_be_python_names(self):
        self.assertIn("not an action name", str(self.assertRaises(
            HrdError, hrd.service_spec, "events.email = no-tify\n")))


class SchemaTests(TestCase):
    def test_types_defaults_and_required(self):
        arguments = hrd.schema("name = type:str default:'web 1'\nport = type:int default:22 required\n"
                               "debug = type:bool default:false\nratio = type:float\n"
                               "tags = type:list default:'a,b'\nhost = required description:'where'\n")
        self.assertEqual(arguments["name"].default, "web 1")
        self.assertEqual((arguments["port"].type, arguments["port"].default, arguments["port"].required),
                         ("int", 22, True))
        self.assertIs(arguments["debug"].default, False)
        self.assertEqual(arguments["tags"].default, ["a", "b"])
        self.assertEqual((arguments["host"].type, arguments["host"].required,
                          arguments["host"].description), ("str", True, "where"))

    def test_unknown_type_and_bad_default_are_errors(self):
        self.assertIn("unknown type 'number'", str(self.assertRaises(HrdError, hrd.schema, "a = type:number\n")))
        self.assertIn("a: default: expected an integer", str(self.assertRaises(
            HrdError, hrd.schema, "a = type:int default:abc\n")))
        self.assertIn("unknown word 'optional'", str(self.assertRaises(HrdError, hrd.schema, "a = optional\n")))

    def test_apply_schema_fills_defaults_and_coerces(self):
        arguments = hrd.schema("port = type:int default:22\nname = type:str required\n")
        self.assertEqual(hrd.apply_schema(arguments, {"name": "n1", "port": "2222"}), {"port": 2222, "name": "n1"})
        self.assertEqual(hrd.apply_schema(arguments, {"name": "n1"}), {"port": 22, "name": "n1"})

    def test_missing_required_argument_is_a_clear_error(self):
        arguments = hrd.schema("name = type:str required\n")
        error = self.assertRaises(ValueError, hrd.apply_schema, arguments, {})
        self.assertEqual(str(error), "argument 'name' is required")

    def test_unknown_and_mistyped_arguments_are_errors(self):
        arguments = hrd.schema("port = type:int\n")
        self.assertIn("unknown argument 'prot'", str(self.assertRaises(
            ValueError, hrd.apply_schema, arguments, {"prot": 1})))
        self.assertIn("argument 'port': expected an integer", str(self.assertRaises(
            ValueError, hrd.apply_schema, arguments, {"port": "x"})))

    def test_no_schema_takes_arguments_as_given(self):
        self.assertEqual(hrd.apply_schema({}, {"anything": [1]}), {"anything": [1]})
