from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from cockpit import config, events, tap
from cockpit.config import ConfigError
from cockpit.decode import DecodeError, decode_yaml
from cockpit.events import EventError

SEEDS = Path(__file__).parent / "seeds"
ROOT = Path(__file__).parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


def write(text: str) -> str:
    handle = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    handle.write(text)
    handle.close()
    return handle.name


class ConfigTests(TestCase):
    def load_text(self, text: str):
        path = write(text)
        self.addCleanup(os.unlink, path)
        return config.load(path), path

    def test_embedded_defaults(self):
        cfg = config.load(None)
        self.assertEqual("tcp:8080:interface=127.0.0.1", cfg.api.endpoint())
        self.assertEqual("tcp:2525:interface=127.0.0.1", cfg.mail.endpoint())
        self.assertIsNone(cfg.redis)
        self.assertIsNone(cfg.bot.token)
        self.assertEqual(Path("cockpit-data/repos"), cfg.repos_dir)
        self.assertEqual("http://127.0.0.1:8080", cfg.public_url)

    def test_seed_config_loads_unchanged(self):
        cfg = config.load(str(SEEDS / "config.toml"))
        self.assertEqual("205766488:AAFBNvCFzNUaKBwND7oHkriEkmFvnVsfLMeg", cfg.bot.token)
        self.assertEqual(25, cfg.mail.port)
        self.assertEqual("0.0.0.0", cfg.api.host)
        self.assertEqual(5000, cfg.api.port)

    def test_example_config_loads(self):
        cfg = config.load(str(ROOT / "config.example.toml"))
        self.assertEqual("redis://127.0.0.1:6379/0", cfg.redis.url)

    def test_listen_endpoint_wins_over_host_and_port(self):
        cfg, _ = self.load_text('[api]\nlisten = "tcp:9000:interface=::1"\nport = 1\n')
        self.assertEqual("tcp:9000:interface=::1", cfg.api.endpoint())

    def test_unknown_key_names_file_section_and_key(self):
        path = write("[api]\nprot = 5000\n")
        self.addCleanup(os.unlink, path)
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(f"{path}: [api] prot: unknown key", str(error))

    def test_a_misspelt_section_is_an_unknown_section_with_the_closest_name(self):
        path = write("[apii]\nport = 5000\n")
        self.addCleanup(os.unlink, path)
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(f"{path}: [apii]: unknown section; did you mean [api]?", str(error))
        path = write("[zzz]\nport = 5000\n")
        self.addCleanup(os.unlink, path)
        self.assertEqual(f"{path}: [zzz]: unknown section", str(self.assertRaises(ConfigError, config.load, path)))
        path = write("zzz = 1\n")  # a key, not a section
        self.addCleanup(os.unlink, path)
        self.assertEqual(f"{path}: zzz: unknown key", str(self.assertRaises(ConfigError, config.load, path)))

    def test_wrong_type_says_what_was_expected(self):
        path = write('[api]\nport = "5000"\n')
        self.addCleanup(os.unlink, path)
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(f"{path}: [api] port: expected an integer, got '5000'", str(error))

    def test_nested_section_errors_name_the_key_path(self):
        path = write('[mail.relay]\nport = true\n')
        self.addCleanup(os.unlink, path)
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertIn("[mail] relay.port: expected an integer", str(error))

    def test_bad_toml_and_missing_file_are_one_line_errors(self):
        path = write("[api\n")
        self.addCleanup(os.unlink, path)
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertIn(f"{path}: not valid TOML", str(error))
        self.assertIn("line 1", str(error))
        missing = self.assertRaises(ConfigError, config.load, "/nonexistent/cockpit.toml")
        self.assertEqual("/nonexistent/cockpit.toml: cannot read the config file: No such file or directory",
                         str(missing))

    def test_redis_url_is_checked_and_split(self):
        cfg, _ = self.load_text('[redis]\nurl = "redis://:s%40cret@db.example:6380/3"\n')
        parts = cfg.redis.connection()
        self.assertEqual(("db.example", 6380, 3, "s@cret"), (parts["host"], parts["port"], parts["db"], parts["password"]))
        self.assertNotIn("cret", cfg.redis.redacted_url())
        path = write('[redis]\nurl = "http://localhost"\n')
        self.addCleanup(os.unlink, path)
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertIn("[redis] url: expected a redis://", str(error))


class YamlBodyHints(TestCase):
    """What a YAML event body gets wrong most often is said in its own words."""

    def test_a_tab_is_named_as_a_tab_with_its_place(self):
        error = self.assertRaises(DecodeError, decode_yaml, "service: node!web1\n\tmsg: down\n")
        self.assertEqual("invalid YAML at line 2, column 1: a tab character; YAML indents with spaces, never tabs",
                         str(error))

    def test_a_bare_no_where_text_is_expected_suggests_quoting(self):
        data = decode_yaml("service: node!web1\nmethod: check\nmsg: no\n")
        error = self.assertRaises(EventError, events.from_data, data, "alarm")
        self.assertEqual("invalid event: msg: expected text, got the boolean false: in YAML a bare no, off or "
                         "false is a boolean; quote it to send the word", str(error))
        error = self.assertRaises(EventError, events.from_data, decode_yaml("subject: yes\n"), "email")
        self.assertIn("subject: expected text, got the boolean true: in YAML a bare yes, on or true", str(error))
        quoted = events.from_data(decode_yaml('service: node!web1\nmethod: check\nmsg: "no"\n'), "alarm")
        self.assertEqual("no", quoted.msg)


class CommandLineTests(TestCase):
    """twistd itself, as an operator runs it."""

    def twistd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([TWISTD, *args], capture_output=True, text=True, cwd=str(ROOT), timeout=60)

    def test_bad_config_exits_non_zero_with_one_line_and_no_traceback(self):
        path = write("[api]\nport = 'x'\nbogus = 1\n")
        self.addCleanup(os.unlink, path)
        result = self.twistd("cockpit", "--config", path)
        self.assertEqual(2, result.returncode)
        self.assertEqual([f"cockpit: {path}: [api] port: expected an integer, got 'x'"],
                         result.stderr.strip().splitlines())
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_mail_notices_without_a_relay_exit_2_with_one_line(self):
        path = write('[notify]\nmail_to = ["oncall@example.org"]\n')
        self.addCleanup(os.unlink, path)
        result = self.twistd("cockpit", "--config", path)
        self.assertEqual((2, [f"cockpit: {path}: [notify] mail_to: notices by mail need a [mail.relay]"]),
                         (result.returncode, result.stderr.strip().splitlines()))

    def data_dir_refused(self, data_dir: str) -> subprocess.CompletedProcess:
        path = write(f'[cockpit]\ndata_dir = "{data_dir}"\n')
        self.addCleanup(os.unlink, path)
        return self.twistd("-n", "--pidfile=", "cockpit", "--config", path)

    def test_a_data_dir_under_a_regular_file_exits_2_with_one_line(self):
        handle = tempfile.NamedTemporaryFile(delete=False)
        handle.close()
        self.addCleanup(os.unlink, handle.name)
        result = self.data_dir_refused(f"{handle.name}/data")
        self.assertEqual((2, 1), (result.returncode, len(result.stderr.strip().splitlines())), result.stderr)
        self.assertRegex(result.stderr, r"^cockpit: .*: \[cockpit\] data_dir: .*/data cannot be created and "
                                        r"written: Not a directory\n$")
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_a_data_dir_that_cannot_be_written_exits_2_with_one_line_and_leaves_nothing(self):
        if os.geteuid() == 0:
            data_dir = "/sys/kernel"  # root writes through any mode bits; sysfs takes no new file from anyone
        else:
            data_dir = tempfile.mkdtemp(prefix="cockpit-ro-")
            os.chmod(data_dir, 0o500)
            self.addCleanup(os.rmdir, data_dir)
        before = sorted(os.listdir(data_dir))
        result = self.data_dir_refused(data_dir)
        self.assertEqual((2, [f"{data_dir} cannot be created and written: Permission denied"]),
                         (result.returncode, [line.partition("[cockpit] data_dir: ")[2]
                                              for line in result.stderr.strip().splitlines()]), result.stderr)
        self.assertEqual(before, sorted(os.listdir(data_dir)))

    def test_a_data_dir_to_be_made_is_made_and_left_empty(self):
        parent = tempfile.mkdtemp(prefix="cockpit-")
        self.addCleanup(shutil.rmtree, parent)
        options = tap.Options()
        path = write(f'[cockpit]\ndata_dir = "{parent}/a/b"\n')
        self.addCleanup(os.unlink, path)
        options.parseOptions(["--config", path])
        self.assertEqual([], os.listdir(f"{parent}/a/b"))

    def test_help_lists_the_config_option(self):
        result = self.twistd("cockpit", "--help")
        self.assertEqual(0, result.returncode)
        self.assertIn("--config", result.stdout)
