"""The Telegram bot: commands as events, access, keyboards, replies, notices, and the AYS robot end to end."""
from __future__ import annotations

import textwrap
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cockpit import config, tap
from cockpit.ays import Robot
from cockpit.backends.embedded import MemoryBus
from cockpit.backends.embedded.runs import SqliteRunHistory
from cockpit.bus import Delivery
from cockpit.events import TelegramEvent
from cockpit.repos import ServiceRecord
from cockpit.telegram import HELP, NO_REPO, TelegramBot, split_text
from cockpit.workers import WorkerPool
from tests.fake_telegram import FakeTelegram, FakeTelegramServer, User
from tests.redis_server import shared_server, started_bus
from tests.test_telegram_api import TOKEN, real_client
from tests.wiring import backend_for, disk_catalog

ALICE = User(1001, "alice", "Alice")
BOB = User(2002, "bob", "Bob")  # not allowed
CAROL = User(3003, "Carol_Ops", "Carol")  # allowed by username
OPS_CHAT = -100500

SCHEMA = "port = type:int default:22\n"
ACTIONS = textwrap.dedent('''
    def install(service, event):
        service.log("installing", service.key)

    def monitor(service, event):
        service.log("all is well on", service.key, "port", service.args["port"])
        return "fine"
''')


def settings(data_dir: str, api_url: str, **bot):
    values = {"token": TOKEN, "api_url": api_url, "allowed_users": [ALICE.id, "@carol_ops"],
              "notify_chats": [OPS_CHAT], **bot}
    return config.from_dict({"cockpit": {"data_dir": data_dir}, "bot": values})


class BotCase(TestCase):
    """A TelegramBot on the embedded bus against the fake, time on a Clock."""

    timeout = 30
    start_bot = True  # False: the test starts it, after it has set up what watches the bot's first steps

    def setUp(self):
        self.clock = Clock()
        self.fake = FakeTelegram(TOKEN, clock=self.clock)
        self.server = FakeTelegramServer(self.fake).start()
        self.addCleanup(self.server.stop)
        self.api = real_client(self, self.server.url, self.clock)
        self.cfg = settings(str(Path(self.mktemp()).absolute()), self.server.url)
        self.bus = MemoryBus(clock=self.clock)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.bot = TelegramBot(self.cfg, backend_for(self.bus, self.cfg.data_dir), self.clock, http=self.api.http)
        if self.start_bot:
            self.bot.startService()
            self.addCleanup(self.bot.stopService)
        self.updates = 0

    @inlineCallbacks
    def say(self, text: str, user: User = ALICE):
        """``user`` writes ``text``; fires once the bot has handled it."""
        self.fake.message(user, text)
        self.updates += 1
        yield self.bot.poller.when_handled(self.updates)

    @inlineCallbacks
    def tap_button(self, message: dict, data: str, user: User = ALICE):
        self.fake.callback(user, message, data)
        self.updates += 1
        yield self.bot.poller.when_handled(self.updates)

    @inlineCallbacks
    def inputs(self):
        events = yield self.bus.recent("telegram", limit=1000)
        return [e for _, e in reversed(events) if e.io == "input"]

    def replies(self, chat: int = ALICE.id) -> list[str]:
        return [m["visible"] for m in self.fake.sent_to(chat)]

    @inlineCallbacks
    def make_repo(self, name: str = "demo", services: tuple[str, ...] = ()):
        """A repository with a template and ``services``, made through the bot's catalog."""
        catalog = self.bot.catalog
        yield catalog.ready
        yield catalog.create_repo(name)
        yield catalog.put_template(name, "node", {"schema.hrd": SCHEMA, "actions.py": ACTIONS})
        yield catalog.put_services(name, [ServiceRecord(name, *key.split("!"), "node", {"port": 22})
                                          for key in services])


class CommandTests(BotCase):
    @inlineCallbacks
    def test_repo_create_publishes_an_input_event_for_the_robot(self):
        yield self.say("/repo create demo")
        [event] = yield self.inputs()
        self.assertEqual((event.type, event.io, event.action, event.source),
                         ("telegram", "input", "repo.create", "telegram"))
        self.assertEqual(event.args, {"chat_id": ALICE.id, "username": "alice", "user_id": ALICE.id,
                                      "name": "demo"})
        # and the user now works in it
        self.assertEqual((yield self.bot.state.current_repo(ALICE.id)), "demo")

    @inlineCallbacks
    def test_each_command_becomes_its_action(self):
        yield self.make_repo("demo", services=("node!n1", "node!n2", "db!main"))
        yield self.say("/repo select demo")
        commands = [
            ("/repo list", "repo.list", {}),
            ("/blueprint list", "bp.list", {"repo": "demo"}),
            ("/blueprint show main", "bp.show", {"repo": "demo", "name": "main.yaml"}),
            ("/blueprint execute main.yaml", "bp.execute", {"repo": "demo", "name": "main.yaml"}),
            ("/blueprint delete old", "bp.delete", {"repo": "demo", "name": "old.yaml"}),
            ("/service list", "service.list", {"repo": "demo"}),
            ("/service list node", "service.list", {"repo": "demo", "role": "node"}),
            ("/service show node!n1", "service.show", {"repo": "demo", "name": "node!n1"}),
            ("/service execute node!n1 monitor", "service.execute",
             {"repo": "demo", "name": "node!n1", "action": "monitor"}),
            ("/repo@cockpit_test_bot delete demo", "repo.delete", {"name": "demo"}),
        ]
        for text, _, _ in commands:
            yield self.say(text)
        events = yield self.inputs()
        self.assertEqual([(e.action, {k: v for k, v in e.args.items()
                                      if k not in ("chat_id", "username", "user_id")}) for e in events],
                         [(action, args) for _, action, args in commands])
        self.assertEqual(len({e.guid for e in events}), len(commands))
        self.assertIsNone((yield self.bot.state.current_repo(ALICE.id)))  # deleted: no longer current

    @inlineCallbacks
    def test_at_role_means_every_service_of_that_role(self):
        yield self.make_repo("demo", services=("node!n1", "node!n2", "db!main"))
        yield self.say("/repo select demo")
        yield self.say("/service execute @node monitor")
        events = yield self.inputs()
        self.assertEqual([(e.action, e.args["name"], e.args["action"]) for e in events],
                         [("service.execute", "node!n1", "monitor"), ("service.execute", "node!n2", "monitor")])
        self.assertEqual(len({e.guid for e in events}), 2)

    @inlineCallbacks
    def test_start_greets_and_help_lists_commands_without_events(self):
        yield self.say("/start")
        yield self.say("/help")
        greeting, help_text = self.replies()
        self.assertTrue(greeting.startswith("Hello Alice!"))
        self.assertIn(HELP, greeting)
        self.assertEqual(help_text, HELP)
        self.assertEqual((yield self.inputs()), [])

    @inlineCallbacks
    def test_blueprint_commands_need_a_current_repo(self):
        yield self.say("/blueprint list")
        self.assertEqual(self.replies(), [NO_REPO])
        self.assertEqual((yield self.inputs()), [])

    @inlineCallbacks
    def test_select_of_an_unknown_repo_is_refused(self):
        yield self.say("/repo select nowhere")
        self.assertIn("There is no repository 'nowhere'", self.replies()[0])
        self.assertIsNone((yield self.bot.state.current_repo(ALICE.id)))

    @inlineCallbacks
    def test_bad_names_are_answered_and_make_no_event(self):
        yield self.make_repo()
        yield self.say("/repo select demo")
        yield self.say("/repo create ../etc")
        yield self.say("/service show nobang")
        first, second = self.replies()[1:]
        self.assertIn("is not a repository name", first)
        self.assertIn("expected role!instance", second)
        self.assertEqual((yield self.inputs()), [])

    @inlineCallbacks
    def test_pasted_blueprint_becomes_bp_create(self):
        yield self.make_repo()
        yield self.say("/repo select demo")
        yield self.say("/blueprint create nodes\nnode__n1:\n  port: 2222\n")
        [event] = yield self.inputs()
        self.assertEqual((event.action, event.args["repo"], event.args["name"], event.args["content"]),
                         ("bp.create", "demo", "nodes.yaml", "node__n1:\n  port: 2222\n"))

    @inlineCallbacks
    def test_blueprint_yaml_can_follow_in_the_next_message(self):
        yield self.make_repo()
        yield self.say("/repo select demo")
        yield self.say("/blueprint create nodes")
        self.assertIn("paste its YAML", self.replies()[-1])
        yield self.say("node__n1: {}\n")
        [event] = yield self.inputs()
        self.assertEqual((event.action, event.args["name"]), ("bp.create", "nodes.yaml"))

    @inlineCallbacks
    def test_broken_blueprint_yaml_is_answered_with_its_line(self):
        yield self.make_repo()
        yield self.say("/repo select demo")
        yield self.say("/blueprint create nodes\nnode__n1:\n  port: [1\n")
        self.assertIn("not valid YAML at line", self.replies()[-1])
        self.assertEqual((yield self.inputs()), [])

    @inlineCallbacks
    def test_yaml_bomb_pasted_or_sent_as_a_file_is_refused_with_why(self):
        from tests.test_hostile_input import alias_bomb

        yield self.make_repo()
        yield self.say("/repo select demo")
        bomb = "node__n1:\n" + "".join("  " + line + "\n" for line in alias_bomb(9).splitlines())
        yield self.say("/blueprint create nodes\n" + bomb)
        self.assertIn("aliases expand it by more than", self.replies()[-1])
        yield self.say("/blueprint create loop\nnode__n1: &a {x: *a}\n")
        self.assertIn("recursive alias", self.replies()[-1])
        self.fake.document(ALICE, "bomb.yaml", bomb.encode())
        self.updates += 1
        yield self.bot.poller.when_handled(self.updates)
        self.assertIn("aliases expand it by more than", self.replies()[-1])
        self.assertEqual((yield self.inputs()), [])

    @inlineCallbacks
    def test_blueprint_sent_as_a_file_is_downloaded_and_created(self):
        yield self.make_repo()
        yield self.say("/repo select demo")
        self.fake.document(ALICE, "cluster.yaml", b"node__n1:\n  port: 2200\n")
        self.updates += 1
        yield self.bot.poller.when_handled(self.updates)
        [event] = yield self.inputs()
        self.assertEqual((event.action, event.args["repo"], event.args["name"], event.args["content"]),
                         ("bp.create", "demo", "cluster.yaml", "node__n1:\n  port: 2200\n"))
        self.assertEqual(self.fake.count("getFile"), 1)

    @inlineCallbacks
    def test_a_file_that_is_not_yaml_is_refused(self):
        yield self.make_repo()
        yield self.say("/repo select demo")
        self.fake.document(ALICE, "photo.jpg", b"\xff\xd8", mime_type="image/jpeg")
        self.updates += 1
        yield self.bot.poller.when_handled(self.updates)
        self.assertIn("send a .yaml file", self.replies()[-1])
        self.assertEqual((yield self.inputs()), [])


class AccessTests(BotCase):
    @inlineCallbacks
    def test_a_user_not_allowed_gets_one_refusal_and_no_event(self):
        for text in ("/repo create evil", "/repo delete demo", "/help"):
            yield self.say(text, user=BOB)
        replies = self.replies(BOB.id)
        self.assertEqual(len(replies), 1)
        self.assertIn("Sorry, I only take commands from this cockpit's operators", replies[0])
        self.assertIn(str(BOB.id), replies[0])
        self.assertEqual((yield self.bus.recent("telegram")), [])

    @inlineCallbacks
    def test_the_refusal_is_not_repeated_after_a_restart(self):
        yield self.say("/help", user=BOB)
        yield self.bot.stopService()
        again = TelegramBot(self.cfg, backend_for(self.bus, self.cfg.data_dir), self.clock, http=self.api.http)
        again.startService()
        self.addCleanup(again.stopService)
        self.fake.message(BOB, "/help")
        yield again.poller.when_handled(1)
        self.assertEqual(len(self.replies(BOB.id)), 1)

    @inlineCallbacks
    def test_a_button_tapped_by_someone_not_allowed_does_nothing(self):
        yield self.say("/repo")
        keyboard_message = self.fake.sent[-1]["message"]
        yield self.tap_button(keyboard_message, "/repo list", user=BOB)
        self.assertEqual(len(self.fake.answered), 1)  # the spinner stops all the same
        self.assertEqual((yield self.inputs()), [])

    @inlineCallbacks
    def test_allowed_by_username_without_case_or_at(self):
        yield self.say("/repo list", user=CAROL)
        [event] = yield self.inputs()
        self.assertEqual((event.action, event.args["username"]), ("repo.list", "Carol_Ops"))


class KeyboardTests(BotCase):
    @inlineCallbacks
    def test_repo_without_argument_offers_a_keyboard_that_is_used_once(self):
        yield self.say("/repo")
        sent = self.fake.sent[-1]
        buttons = [b["callback_data"] for row in sent["reply_markup"]["inline_keyboard"] for b in row]
        self.assertEqual(buttons, ["/repo list", "/repo select", "/repo delete"])
        query = self.fake.callback(ALICE, sent["message"], "/repo list")["callback_query"]
        self.updates += 1
        yield self.bot.poller.when_handled(self.updates)
        self.assertEqual([a["callback_query_id"] for a in self.fake.answered], [query["id"]])
        self.assertEqual(len(self.fake.edited), 1)
        self.assertNotIn("reply_markup", self.fake.messages[(ALICE.id, sent["message_id"])])
        [event] = yield self.inputs()
        self.assertEqual(event.action, "repo.list")

    @inlineCallbacks
    def test_select_keyboard_lists_the_repos_on_disk(self):
        yield self.make_repo("alpha")
        yield self.make_repo("beta")
        yield self.say("/repo select")
        sent = self.fake.sent[-1]
        self.assertEqual([b["callback_data"] for row in sent["reply_markup"]["inline_keyboard"] for b in row],
                         ["/repo select alpha", "/repo select beta"])
        yield self.tap_button(sent["message"], "/repo select beta")
        self.assertEqual(self.replies()[-1], "Now working in repository beta.")
        self.assertEqual((yield self.bot.state.current_repo(ALICE.id)), "beta")

    @inlineCallbacks
    def test_service_execute_picks_service_then_action_from_keyboards(self):
        yield self.make_repo("demo", services=("node!n1", "node!n2"))
        yield self.say("/repo select demo")
        yield self.say("/service execute")
        services = [b["callback_data"] for row in self.fake.sent[-1]["reply_markup"]["inline_keyboard"]
                    for b in row]
        self.assertEqual(services, ["/service execute node!n1", "/service execute node!n2",
                                    "/service execute @node"])
        yield self.tap_button(self.fake.sent[-1]["message"], "/service execute node!n2")
        actions = [b["callback_data"] for row in self.fake.sent[-1]["reply_markup"]["inline_keyboard"]
                   for b in row]
        self.assertEqual(actions, ["/service execute node!n2 install", "/service execute node!n2 monitor"])
        yield self.tap_button(self.fake.sent[-1]["message"], "/service execute node!n2 monitor")
        [event] = yield self.inputs()
        self.assertEqual((event.action, event.args["name"], event.args["action"]),
                         ("service.execute", "node!n2", "monitor"))


class OutputTests(BotCase):
    def publish_reply(self, text: str, chat_id: int = ALICE.id, **extra):
        return self.bus.publish(TelegramEvent(io="output", action="message", source="ays",
                                              args={"chat_id": chat_id, "msg": text, **extra}))

    @inlineCallbacks
    def test_a_10000_character_reply_arrives_as_three_messages_shown_literally(self):
        line = "if a < b && c > d: snake_case_name = 1 & <b>not bold</b>\n"
        text = (line * (10000 // len(line) + 1))[:10000]
        yield self.publish_reply(text)
        yield self.fake.wait_for("sendMessage", 3)
        messages = self.fake.sent_to(ALICE.id)
        self.assertEqual(len(messages), 3)
        self.assertEqual("".join(m["visible"] for m in messages), text)
        self.assertTrue(all(len(m["visible"]) <= 4096 for m in messages))
        self.assertTrue(all(m["parse_mode"] == "HTML" for m in messages))
        self.assertIn("&lt;b&gt;not bold&lt;/b&gt;", messages[0]["text"])
        self.assertTrue(messages[0]["visible"].endswith("\n"))  # cut at a line end
        yield self.wait_acked()

    @inlineCallbacks
    def wait_acked(self):
        while (yield self.bus.pending("telegram", ["telegram"])):
            yield task.deferLater(reactor, 0, lambda: None)

    @inlineCallbacks
    def test_output_waits_out_a_429(self):
        self.fake.fail_next("sendMessage", 429, retry_after=3)
        waiting = self.bot.sender.next_wait()
        yield self.publish_reply("hello")
        self.assertEqual((yield waiting), 3)
        self.assertEqual(self.fake.sent, [])
        self.clock.advance(3)
        yield self.fake.wait_for("sendMessage", 2)
        self.assertEqual(self.replies(), ["hello"])
        yield self.wait_acked()

    @inlineCallbacks
    def test_output_to_a_chat_telegram_refuses_is_dropped_not_retried(self):
        yield self.publish_reply("hello", chat_id="not-a-chat")
        yield self.fake.wait_for("sendMessage", 1)
        yield self.wait_acked()
        self.assertEqual(self.fake.sent, [])

    @inlineCallbacks
    def test_an_output_keyboard_becomes_buttons(self):
        yield self.publish_reply("Pick one", keyboard=[["Monitor", "/service execute node!n1 monitor"]])
        yield self.fake.wait_for("sendMessage", 1)
        self.assertEqual(self.fake.sent[0]["reply_markup"]["inline_keyboard"],
                         [[{"text": "Monitor", "callback_data": "/service execute node!n1 monitor"}]])

    @inlineCallbacks
    def test_an_output_older_than_an_hour_is_dropped(self):
        # a group created on an old stream starts from its beginning: old replies are not news
        clock = Clock()
        clock.advance(10000)
        bot = TelegramBot(self.cfg, backend_for(self.bus, self.cfg.data_dir), clock, http=self.api.http)
        stale = TelegramEvent(io="output", action="message", epoch=0, args={"chat_id": ALICE.id, "msg": "old"})
        fresh = TelegramEvent(io="output", action="message", epoch=9000, args={"chat_id": ALICE.id, "msg": "new"})
        yield bot.deliver(stale, Delivery("ckpt.telegram", "1-0", 1))
        yield bot.deliver(fresh, Delivery("ckpt.telegram", "2-0", 1))
        self.assertEqual(self.replies(), ["new"])

    def test_split_text_cuts_at_line_ends_and_hard_splits_a_long_line(self):
        text = "a" * 10 + "\n" + "b" * 25 + "\n" + "c\n"
        pieces = split_text(text, limit=12)
        self.assertEqual("".join(pieces), text)
        self.assertEqual(pieces, ["a" * 10 + "\n", "b" * 12, "b" * 12, "b\n" + "c\n"])
        self.assertEqual(split_text("short"), ["short"])


class TwoProcessTests(TestCase):
    """Two cockpit processes (two buses, one Redis) with one token."""

    timeout = 20

    @inlineCallbacks
    def test_each_reply_is_sent_once_and_one_process_polls(self):
        redis = shared_server()
        redis.flush()
        clock = Clock()
        fake = FakeTelegram(TOKEN, clock=clock)
        server = FakeTelegramServer(fake).start()
        self.addCleanup(server.stop)
        api = real_client(self, server.url, clock)
        cfg = config.from_dict({"cockpit": {"data_dir": str(Path(self.mktemp()).absolute())},
                                "redis": {"url": redis.url},
                                "bot": {"token": TOKEN, "api_url": server.url, "allowed_users": [ALICE.id]}})
        bots = []
        for _ in range(2):
            bus = yield started_bus(self, url=redis.url)
            bot = TelegramBot(cfg, backend_for(bus, cfg.data_dir), clock, http=api.http)
            bot.startService()
            self.addCleanup(bot.stopService)
            bots.append(bot)
        for n in range(6):
            yield bots[n % 2].bus.publish(TelegramEvent(io="output", action="message",
                                                        args={"chat_id": ALICE.id, "msg": f"reply {n}"}))
        yield fake.wait_for("sendMessage", 6)
        fake.message(ALICE, "/repo list")
        yield defer.DeferredList([b.poller.when_handled(1) for b in bots], fireOnOneCallback=True)
        while (yield bots[0].bus.pending("telegram", ["telegram"])):  # until every entry is acked
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(sorted(m["visible"] for m in fake.sent), [f"reply {n}" for n in range(6)])
        self.assertEqual(sorted(b.poller.handled for b in bots), [0, 1])
        self.assertEqual(fake.conflicts, 0)


class WiringTests(TestCase):
    def test_build_adds_the_bot_only_with_a_token(self):
        base = str(Path(self.mktemp()).absolute())
        listen = {"api": {"listen": "tcp:0:interface=127.0.0.1"}, "mail": {"listen": "tcp:0:interface=127.0.0.1"}}
        without = tap.build(config.from_dict({"cockpit": {"data_dir": base}, **listen}), reactor)
        self.assertNotIn("telegram", [s.name for s in without])
        cfg = config.from_dict({"cockpit": {"data_dir": base}, "bot": {"token": TOKEN}, **listen})
        top = tap.build(cfg, reactor)
        bot = top.getServiceNamed("telegram")
        self.assertIsInstance(bot, TelegramBot)
        self.assertIsNone(bot.poller.lease)  # the embedded bus: no lease needed
        self.assertEqual(bot.api.api_url, "https://api.telegram.org")
        self.assertIn("telegram", top.api.services)
        self.assertNotIn("notices", [s.name for s in top])  # no notify_chats: nowhere to send notices
        with_chats = tap.build(config.from_dict({"cockpit": {"data_dir": base}, **listen,
                                                 "bot": {"token": TOKEN, "notify_chats": [OPS_CHAT]}}), reactor)
        notifier = with_chats.getServiceNamed("notices")
        self.assertEqual([with_chats.getServiceNamed("telegram").notices], notifier.channels)
        self.assertIn("notices", with_chats.api.services)
        return defer.gatherResults([bot.api.close(), with_chats.getServiceNamed("telegram").api.close()])


class EndToEndTests(TestCase):
    """Chat -> fake Bot API -> poller -> bus -> the real AYS robot and its workers -> bus -> chat."""

    timeout = 15

    @inlineCallbacks
    def setUp(self):
        self.fake = FakeTelegram(TOKEN)
        self.server = FakeTelegramServer(self.fake).start()
        self.addCleanup(self.server.stop)
        base = Path(self.mktemp()).absolute()
        self.cfg = settings(str(base), self.server.url)
        self.bus = MemoryBus(clock=reactor)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)
        self.robot = Robot(disk_catalog(self.cfg.repos_dir), self.bus, SqliteRunHistory(base / "runs.sqlite", reactor),
                           WorkerPool(1, action_timeout=10.0, reactor=reactor), clock=reactor)
        self.robot.startService()
        self.addCleanup(self.robot.stopService)
        yield self.robot.ready
        # its own pooled treq client, on a real port; the robot's catalog, as the cockpit hands it over
        self.bot = TelegramBot(self.cfg, backend_for(self.bus, self.cfg.data_dir), reactor,
                               catalog=self.robot.catalog)
        self.bot.startService()
        self.addCleanup(self.bot.stopService)

    @inlineCallbacks
    def reply_to(self, text: str = None, document: tuple = None):
        """Send a message (or a document) as Alice; fires with the robot's answer."""
        before = len(self.fake.sent_to(ALICE.id))
        if document:
            self.fake.document(ALICE, *document)
        else:
            self.fake.message(ALICE, text)
        yield self.fake.wait_for("sendMessage", len(self.fake.sent) + 1)
        return self.fake.sent_to(ALICE.id)[before]["visible"]

    @inlineCallbacks
    def test_repo_blueprint_file_and_service_execute_through_the_robot(self):
        answer = yield self.reply_to("/repo create demo")
        self.assertEqual(answer, "Repository demo created.")
        self.assertTrue((self.cfg.repos_dir / "demo" / ".ays").is_file())
        # templates come over the REST API; the robot's own call stands in for it here
        yield self.robot.catalog.put_template("demo", "node", {"schema.hrd": SCHEMA, "actions.py": ACTIONS})
        answer = yield self.reply_to(document=("cluster.yaml", b"node__n1:\n  port: 2200\nnode__n2: {}\n"))
        # stored and executed, as the original bot's /blueprint add did
        self.assertIn("Blueprint cluster.yaml stored in demo and executed.", answer)
        self.assertIn("node!n1 install: ok", answer)
        self.assertIn("node!n2 install: ok", answer)
        runs = yield self.robot.list_runs(service="node!n1", action="install")
        self.assertEqual([("ok", "telegram")], [(r["state"], r["trigger"]["kind"]) for r in runs])
        answer = yield self.reply_to("/blueprint execute cluster")  # again
        self.assertIn("Blueprint cluster.yaml executed in demo.", answer)
        self.assertIn("node!n1 install: ok", answer)
        self.assertEqual(sorted(p.name for p in (self.cfg.repos_dir / "demo" / "services").iterdir()),
                         ["node!n1", "node!n2"])
        answer = yield self.reply_to("/service execute node!n1 monitor")
        self.assertIn("node!n1 monitor: ok", answer)
        self.assertIn("all is well on node!n1 port 2200", answer)
        runs = yield self.robot.list_runs(service="node!n1", action="monitor")
        self.assertEqual([(r["state"], r["trigger"]["kind"]) for r in runs], [("ok", "telegram")])

    @inlineCallbacks
    def test_list_and_show_commands_are_answered_by_the_robot(self):
        self.assertIn("no repository yet", (yield self.reply_to("/repo list")))
        yield self.reply_to("/repo create demo")
        self.assertEqual("Repositories:\n- demo", (yield self.reply_to("/repo list")))
        yield self.robot.catalog.put_template("demo", "node", {"schema.hrd": SCHEMA, "actions.py": ACTIONS})
        self.assertIn("node!n1 install: ok", (yield self.reply_to("/blueprint create cluster\nnode__n1:\n  port: 2200\n")))
        self.assertIn("- cluster.yaml (ok)", (yield self.reply_to("/blueprint list")))
        self.assertIn("node__n1:", (yield self.reply_to("/blueprint show cluster")))
        yield self.reply_to("/blueprint execute cluster")
        self.assertIn("- node!n1 install: ok", (yield self.reply_to("/service list")))
        self.assertIn('"port": 2200', (yield self.reply_to("/service show node!n1")))
