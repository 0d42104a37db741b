"""The Telegram bot: chat commands become events, output events become messages, alarms become notices.

- :class:`ChatCommands` turns each update from an allowed user into one ``telegram`` input event
  (``io: input``, ``source: telegram``, ``args`` with ``chat_id``, ``username`` and ``user_id``)
  for the AYS robot, and answers what it can itself (``/start``, ``/help``, keyboards).
- :class:`MessageSender` sends plain text with parse mode HTML: escaped, split under Telegram's
  4096 characters at line boundaries, waiting out 429s.
- :class:`TelegramNotices` sends the notices of :mod:`cockpit.notices` to ``[bot] notify_chats``,
  with the buttons Ack, Close and Silence 1h; a tap changes the group and edits the notice.
- :class:`TelegramBot` wires them: the long-poller (``cockpit.telegram_poll``) and a consumer of
  output events (group ``telegram``).

Client: ``cockpit.telegram_api``; polling, state and lease: ``cockpit.telegram_poll``.
"""
from __future__ import annotations

import html
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator, Optional, Sequence, Union

from twisted.application.service import MultiService
from twisted.internet import task, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cockpit import repos as ays_repos
from cockpit.ays_catalog import Catalog
from cockpit.backoff import doubling
from cockpit.bus import Bus, Delivery
from cockpit.config import Config
from cockpit.events import Event, TelegramEvent
from cockpit.telegram_api import ApiUnreachable, BadToken, BotApi, RetryAfter, TelegramError
from cockpit.telegram_poll import BotState, UpdatePoller

if TYPE_CHECKING:
    from cockpit.backends import Backend

log = Logger()

MAX_MESSAGE = 4096  # characters of text after entity parsing, as Telegram counts them
MAX_CALLBACK_DATA = 64  # bytes
MAX_BUTTONS = 48
SILENCE_SECONDS = 3600.0  # what a notice's "Silence 1h" silences its group for
LIST_GROUPS = 10  # groups /ecos and /alarms show
OUTPUT_GROUP = "telegram"
# a uuid5 namespace: an update's event guid is derived from (bot, update_id), so an update
# published again after a crash carries the same guid and the robot does not run it twice
UPDATE_NAMESPACE = uuid.UUID("5b0c1f8e-3f7a-4c57-9a57-6f1b4d1c7e21")


# ---------------------------------------------------------------------------
# sending
# ---------------------------------------------------------------------------

def split_text(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at line ends where possible.

    A line longer than ``limit`` is cut hard. Joining the pieces gives back ``text``.
    """
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:  # one over-long line: cut it hard
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:limit])
            line = line[limit:]
        if len(current) + len(line) > limit:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def inline_keyboard(buttons: Sequence[tuple[str, str]], columns: int = 2) -> Optional[dict[str, Any]]:
    """An inline keyboard of ``(label, command)`` buttons; commands too long for callback_data are left out."""
    usable = [(label, command) for label, command in buttons
              if 1 <= len(command.encode()) <= MAX_CALLBACK_DATA][:MAX_BUTTONS]
    if len(usable) < len(buttons):
        log.warn("{count} keyboard buttons left out (callback data over 64 bytes, or too many)",
                 count=len(buttons) - len(usable))
    if not usable:
        return None
    rows = [[{"text": label[:64], "callback_data": command} for label, command in usable[i:i + columns]]
            for i in range(0, len(usable), columns)]
    return {"inline_keyboard": rows}


class MessageSender:
    """Sends plain text to a chat: escaped for parse mode HTML, split, and patient with 429s."""

    def __init__(self, api: BotApi, clock: IReactorTime, max_attempts: int = 5, backoff_cap: float = 30.0):
        self.api = api
        self.clock = clock
        self.max_attempts = max_attempts
        self.backoff_cap = backoff_cap
        self.attempts = 0  # sendMessage calls made
        self._wait_watchers: list[Deferred[float]] = []

    def next_wait(self) -> Deferred[float]:
        """Fires with the seconds of the next wait before a retry (after the timer is set)."""
        d: Deferred[float] = Deferred()
        self._wait_watchers.append(d)
        return d

    def _wait(self, seconds: float) -> Deferred[None]:
        sleep = task.deferLater(self.clock, seconds, lambda: None)
        watchers, self._wait_watchers = self._wait_watchers, []
        for d in watchers:
            d.callback(seconds)
        return sleep

    @inlineCallbacks
    def send(self, chat_id: Any, text: str, keyboard: Optional[dict[str, Any]] = None, skip: int = 0,
             progress: Optional[Callable[[int], None]] = None) -> Generator[Deferred[Any], Any, list[dict[str, Any]]]:
        """Send ``text``; fires with the messages sent (the keyboard goes on the last one).

        ``skip`` leaves out pieces already sent by an earlier attempt; ``progress(n)`` is told
        after each piece. Fails with BadRequest (no retry helps) or ApiUnreachable.
        """
        if not text.strip():
            text = "(empty message)"
        pieces = split_text(text)
        sent: list[dict[str, Any]] = []
        for number, piece in enumerate(pieces):
            if number < skip:
                continue
            markup = keyboard if number == len(pieces) - 1 else None
            message = yield self._send_piece(chat_id, html.escape(piece, quote=False), markup)
            sent.append(message)
            if progress is not None:
                progress(number + 1)
        return sent

    @inlineCallbacks
    def _send_piece(self, chat_id: Any, escaped: str,
                    markup: Optional[dict[str, Any]]) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        failures = 0
        while True:
            try:
                self.attempts += 1
                message: dict[str, Any] = yield self.api.send_message(chat_id, escaped, parse_mode="HTML",
                                                                      reply_markup=markup)
                return message
            except RetryAfter as exc:
                failures += 1
                if failures >= self.max_attempts:
                    raise
                log.info("Telegram flood control: waiting {seconds} s before sending to {chat}",
                         seconds=exc.retry_after, chat=chat_id)
                yield self._wait(exc.retry_after)
            except ApiUnreachable as exc:
                failures += 1
                if failures >= self.max_attempts:
                    raise
                seconds = doubling(1.0, failures, self.backoff_cap)
                log.warn("sendMessage failed ({error}); retrying in {seconds} s", error=exc, seconds=seconds)
                yield self._wait(seconds)


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

HELP = """Commands:
/repo list: the AYS repositories
/repo create NAME: make a repository and work in it
/repo select NAME: work in repository NAME
/repo delete NAME: delete a repository
/blueprint list, /blueprint show NAME
/blueprint create NAME, with the YAML on the lines below (or send a .yaml file): store and execute it
/blueprint execute NAME: run it again, /blueprint delete NAME
/service list [ROLE], /service show KEY
/service execute KEY ACTION: KEY is role!instance; @role means every service of that role
/ecos, /alarms: the open error conditions and the firing alarms, with their buttons
/help: this list
Without a name, /repo, /blueprint and /service offer buttons."""

REFUSAL = ("Sorry, I only take commands from this cockpit's operators. If you should be one, ask an "
           "operator to add your Telegram user id {user_id} to [bot] allowed_users.")
NO_REPO = "No repository selected: /repo select NAME picks one, /repo create NAME makes one."


class CommandError(Exception):
    """A command that cannot be carried out; ``str()`` is the reply to the user."""


@dataclass
class Chat:
    """Who said something, where, and the update it came in."""

    chat_id: int
    user_id: int
    username: str
    first_name: str
    update_id: int
    bot_id: str

    def guid(self, index: int = 0) -> str:
        """The guid of this update's ``index``-th event: the same whenever the update is handled."""
        name = f"{self.bot_id}:{self.update_id}" + (f":{index}" if index else "")
        return str(uuid.uuid5(UPDATE_NAMESPACE, name))


def is_allowed(user: dict[str, Any], allowed: Sequence[Union[int, str]]) -> bool:
    """Whether the Telegram ``user`` is named in ``allowed`` by id or by username (without case or @)."""
    user_id = user.get("id")
    username = (user.get("username") or "").lower()
    for entry in allowed:
        if isinstance(entry, int) or (isinstance(entry, str) and entry.lstrip("-").isdigit()):
            if int(entry) == user_id:
                return True
        elif username and entry.lstrip("@").lower() == username:
            return True
    return False


class ChatCommands:
    """Turns updates into events and replies. ``handle_update`` fires once the event is published.

    Its keyboards and checks ask ``catalog`` what repositories, blueprints and services there are.
    """

    def __init__(self, api: BotApi, sender: MessageSender, bus: Bus, state: BotState,
                 allowed_users: Sequence[Union[int, str]], catalog: Catalog, clock: IReactorTime,
                 groups: Any = None, silences: Any = None):
        self.api = api
        self.groups = groups  # the GroupStore the notices' buttons and /ecos, /alarms act on
        self.silences = silences
        self.clock = clock
        self.sender = sender
        self.bus = bus
        self.state = state
        self.allowed_users = list(allowed_users)
        self.catalog = catalog
        # a user who said "/blueprint create NAME" and whose YAML comes next: user id -> (repo, name)
        self.awaiting_blueprint: dict[int, tuple[str, Optional[str]]] = {}
        self.published = 0

    # -- entry point ---------------------------------------------------------------
    @inlineCallbacks
    def handle_update(self, update: dict[str, Any]) -> Generator[Deferred[Any], Any, None]:
        if "callback_query" in update:
            yield self._callback(update["update_id"], update["callback_query"])
        elif "message" in update:
            yield self._message(update["update_id"], update["message"])

    def _chat(self, update_id: int, user: dict[str, Any], chat: dict[str, Any]) -> Chat:
        chat_id: Any = chat.get("id", user.get("id"))  # JSON: Telegram's ids are integers
        return Chat(chat_id=chat_id, user_id=user.get("id", 0),
                    username=user.get("username") or "", first_name=user.get("first_name") or "",
                    update_id=update_id, bot_id=self.api.bot_id)

    @inlineCallbacks
    def _allowed(self, user: dict[str, Any], chat: Chat) -> Generator[Deferred[Any], Any, bool]:
        if is_allowed(user, self.allowed_users):
            return True
        log.info("refused a command from Telegram user {user_id} (@{username}): not in [bot] allowed_users",
                 user_id=chat.user_id, username=chat.username)
        if (yield self.state.first_refusal(chat.user_id)):
            yield self.reply(chat, REFUSAL.format(user_id=chat.user_id))
        return False

    @inlineCallbacks
    def _message(self, update_id: int, message: dict[str, Any]) -> Generator[Deferred[Any], Any, None]:
        user = message.get("from") or {}
        chat = self._chat(update_id, user, message.get("chat") or {})
        if user.get("is_bot") or not (yield self._allowed(user, chat)):
            return
        text = message.get("text")
        if "document" in message:
            yield self._guarded(chat, self._document(chat, message["document"], message.get("caption") or ""))
        elif isinstance(text, str) and text.startswith("/"):
            yield self._guarded(chat, self.command(chat, text))
        elif isinstance(text, str) and chat.user_id in self.awaiting_blueprint:
            repo, name = self.awaiting_blueprint[chat.user_id]
            if name is None:
                yield self.reply(chat, "What is the blueprint's name? Send /blueprint create NAME with the "
                                       "YAML on the lines below it, or send a .yaml file.")
                return
            yield self._guarded(chat, self._create_blueprint(chat, repo, name, text))
        else:
            yield self.reply(chat, "I understand commands. /help lists them.")

    @inlineCallbacks
    def _callback(self, update_id: int, query: dict[str, Any]) -> Generator[Deferred[Any], Any, None]:
        user = query.get("from") or {}
        message = query.get("message") or {}
        chat = self._chat(update_id, user, message.get("chat") or {"id": user.get("id")})
        data = query.get("data")
        if isinstance(data, str) and data.startswith("g:"):
            yield self._group_button(query, user, chat, data)
            return
        # answered in any case: the user's client shows a spinner until it is
        yield self._best_effort(self.api.answer_callback_query(str(query.get("id"))), "answerCallbackQuery")
        if not (yield self._allowed(user, chat)):
            return
        if message.get("message_id") is not None:
            # a keyboard is used once: take it off so an old button cannot be tapped again
            yield self._best_effort(self.api.remove_keyboard(chat.chat_id, message["message_id"]),
                                    "editMessageReplyMarkup")
        if isinstance(data, str) and data.startswith("/"):
            yield self._guarded(chat, self.command(chat, data))

    @inlineCallbacks
    def _group_button(self, query: dict[str, Any], user: dict[str, Any], chat: Chat,
                      data: str) -> Generator[Deferred[Any], Any, None]:
        """Ack, Close or Silence 1h tapped on a notice: the same as the REST calls, by this user."""
        query_id = str(query.get("id"))
        if not is_allowed(user, self.allowed_users):
            log.info("refused a button from Telegram user {user_id} (@{username}): not in [bot] allowed_users",
                     user_id=chat.user_id, username=chat.username)
            yield self._best_effort(self.api.answer_callback_query(query_id, NOT_ALLOWED), "answerCallbackQuery")
            return
        found = GROUP_BUTTON.match(data)
        if found is None or self.groups is None:
            yield self._best_effort(self.api.answer_callback_query(query_id, "This button is no longer valid."),
                                    "answerCallbackQuery")
            return
        letter, kind, group_id = found.group(1), LETTER_KIND[found.group(2)], found.group(3)
        who = f"@{chat.username}" if chat.username else f"telegram:{chat.user_id}"
        try:
            if letter == "s":
                if self.silences is None:
                    raise CommandError("Silences are not kept by this cockpit.")
                from cockpit.silences import NewSilence

                yield self.silences.add(NewSilence(matchers={"id": group_id}, starts=None, ends=None,
                                                   duration=SILENCE_SECONDS,
                                                   comment="from a Telegram notice", created_by=who),
                                        self._now())
                group = yield self.groups.get(kind, group_id)
            else:
                group = yield self.groups.act(kind, group_id, "ack" if letter == "a" else "close", who)
            if group is None:
                raise CommandError("That group is gone (it ended long ago).")
        except CommandError as exc:
            yield self._best_effort(self.api.answer_callback_query(query_id, str(exc)), "answerCallbackQuery")
            return
        except Exception as exc:  # the store is away: say so, the user can tap again
            log.warn("a {kind} group button could not be carried out: {error}", kind=kind, error=exc)
            yield self._best_effort(self.api.answer_callback_query(query_id, "The cockpit cannot do that now; "
                                                                   "try again in a moment."), "answerCallbackQuery")
            return
        done = f"{DID[letter]} by {who} at {time.strftime('%H:%M UTC', time.gmtime(self._now()))}"
        yield self._best_effort(self.api.answer_callback_query(query_id, done), "answerCallbackQuery")
        message = query.get("message") or {}
        if message.get("message_id") is not None and isinstance(message.get("text"), str):
            text = f"{message['text']}\n\n{done}"[:MAX_MESSAGE]
            yield self._best_effort(self.api.edit_message_text(
                chat.chat_id, message["message_id"], html.escape(text, quote=False),
                reply_markup=group_buttons(kind, group) or {"inline_keyboard": []}), "editMessageText")

    def _now(self) -> float:
        return self.clock.seconds()

    @inlineCallbacks
    def _open_groups(self, chat: Chat, kind: str) -> Generator[Deferred[Any], Any, None]:
        """/ecos and /alarms: the open groups, latest first, each with its buttons."""
        from cockpit.notices import OPEN_STATES, notice_text

        if self.groups is None:
            yield self.reply(chat, "This cockpit keeps no groups.")
            return
        found = []
        for state in OPEN_STATES[kind]:
            page, _ = yield self.groups.page(kind, LIST_GROUPS + 1, None, state)
            found += page
        found.sort(key=lambda g: (g["last_time"], g["id"]), reverse=True)
        if not found:
            yield self.reply(chat, "No open error conditions." if kind == "eco" else "No alarm is firing.")
            return
        for group in found[:LIST_GROUPS]:
            try:
                yield self.sender.send(chat.chat_id, notice_text(kind, group, "repeat"), group_buttons(kind, group))
            except TelegramError as exc:
                log.warn("could not reply to chat {chat}: {error}", chat=chat.chat_id, error=exc)
                return
        if len(found) > LIST_GROUPS:
            yield self.reply(chat, f"And more: the {LIST_GROUPS} latest are above. GET /api/"
                                   f"{kind}s?state=... lists them all.")

    @staticmethod
    def _best_effort(d: Deferred[Any], what: str) -> Deferred[Any]:
        # e.g. a query older than Telegram keeps (after a restart): the command still counts
        return d.addErrback(lambda f: log.warn("{what} failed: {error}", what=what, error=f.getErrorMessage()))

    @inlineCallbacks
    def _guarded(self, chat: Chat, work: Deferred[Any]) -> Generator[Deferred[Any], Any, None]:
        try:
            yield work
        except CommandError as exc:
            yield self.reply(chat, str(exc))
        except ays_repos.AysError as exc:
            yield self.reply(chat, str(exc))

    # -- replies and events ------------------------------------------------------------
    @inlineCallbacks
    def reply(self, chat: Chat, text: str,
              buttons: Sequence[tuple[str, str]] = ()) -> Generator[Deferred[Any], Any, None]:
        """Send ``text`` (with buttons) to the chat; a failure is logged, never raised."""
        try:
            yield self.sender.send(chat.chat_id, text, inline_keyboard(buttons) if buttons else None)
        except TelegramError as exc:
            log.warn("could not reply to chat {chat}: {error}", chat=chat.chat_id, error=exc)

    @inlineCallbacks
    def publish(self, chat: Chat, action: str, /, _index: int = 0,
                **args: Any) -> Generator[Deferred[Any], Any, TelegramEvent]:
        """Publish a telegram input event for this update (BusUnavailable: the poller retries)."""
        event = TelegramEvent(io="input", action=action, source="telegram", guid=chat.guid(_index),
                              args={"chat_id": chat.chat_id, "username": chat.username,
                                    "user_id": chat.user_id, **args})
        yield self.bus.publish(event)
        self.published += 1
        log.info("telegram {action} from @{username} published as {guid}", action=action,
                 username=chat.username or chat.user_id, guid=event.guid)
        return event

    def _in_thread(self, method: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return threads.deferToThread(method, *args)

    @inlineCallbacks
    def _repo_snapshot(self, repo: str) -> Generator[Deferred[Any], Any, ays_repos.RepoSnapshot]:
        """What the catalog holds of ``repo``, current as of now; NotFound when there is none."""
        catalog: Catalog = yield self.catalog.view()
        return catalog.repo(repo)

    @inlineCallbacks
    def _current_repo(self, chat: Chat) -> Generator[Deferred[Any], Any, str]:
        repo: Optional[str] = yield self.state.current_repo(chat.user_id)
        if not repo:
            raise CommandError(NO_REPO)
        return repo

    # -- commands -------------------------------------------------------------------
    @inlineCallbacks
    def command(self, chat: Chat, text: str) -> Generator[Deferred[Any], Any, None]:
        """Carry out one command line (from a message or a button)."""
        first, _, rest = text.partition("\n")
        words = first.split()
        name = words[0][1:].split("@", 1)[0].lower()
        args = words[1:]
        if name == "start":
            yield self.reply(chat, f"Hello {chat.first_name or chat.username}! I am the cockpit's bot: I manage "
                                   "AYS repositories, blueprints and services, and pass on alarms.\n\n" + HELP)
        elif name == "help":
            yield self.reply(chat, HELP)
        elif name == "repo":
            yield self._repo(chat, args)
        elif name in ("blueprint", "bp"):
            yield self._blueprint(chat, args, rest)
        elif name == "service":
            yield self._service(chat, args)
        elif name in ("ecos", "alarms"):
            yield self._open_groups(chat, name[:-1])
        else:
            yield self.reply(chat, f"I do not know /{name}. /help lists what I can do.")

    @inlineCallbacks
    def _repo(self, chat: Chat, args: list[str]) -> Generator[Deferred[Any], Any, None]:
        sub = args[0].lower() if args else ""
        name = " ".join(args[1:])
        if sub == "":
            yield self.reply(chat, "Repositories: what shall I do? (/repo create NAME makes one.)",
                             [("List", "/repo list"), ("Select", "/repo select"), ("Delete", "/repo delete")])
        elif sub == "list":
            yield self.publish(chat, "repo.list")
        elif sub == "create":
            if not name:
                raise CommandError("Which name? /repo create NAME")
            ays_repos.check_repo_name(name)
            yield self.publish(chat, "repo.create", name=name)
            yield self.state.set_current_repo(chat.user_id, name)
        elif sub in ("select", "delete"):
            if not name:
                yield self._choose_repo(chat, sub)
                return
            ays_repos.check_repo_name(name)
            if sub == "delete":
                yield self.publish(chat, "repo.delete", name=name)
                if (yield self.state.current_repo(chat.user_id)) == name:
                    yield self.state.set_current_repo(chat.user_id, None)
                return
            catalog = yield self.catalog.view()
            if name not in catalog.repo_names():
                raise CommandError(f"There is no repository {name!r}. /repo list shows them.")
            yield self.state.set_current_repo(chat.user_id, name)
            yield self.reply(chat, f"Now working in repository {name}.")
        else:
            raise CommandError("/repo list, create NAME, select NAME or delete NAME")

    @inlineCallbacks
    def _choose_repo(self, chat: Chat, sub: str) -> Generator[Deferred[Any], Any, None]:
        catalog = yield self.catalog.view()
        known = catalog.repo_names()
        if not known:
            raise CommandError("There are no repositories yet: /repo create NAME makes one.")
        yield self.reply(chat, f"Which repository shall I {sub}?", [(r, f"/repo {sub} {r}") for r in known])

    @inlineCallbacks
    def _blueprint(self, chat: Chat, args: list[str], rest: str) -> Generator[Deferred[Any], Any, None]:
        sub = args[0].lower() if args else ""
        name = args[1] if len(args) > 1 else ""
        if sub == "":
            yield self.reply(chat, "Blueprints: what shall I do? (/blueprint create NAME with the YAML below "
                                   "it, or a .yaml file, makes one.)",
                             [("List", "/blueprint list"), ("Show", "/blueprint show"),
                              ("Execute", "/blueprint execute"), ("Delete", "/blueprint delete")])
            return
        if sub not in ("list", "show", "create", "execute", "delete"):
            raise CommandError("/blueprint list, show NAME, create NAME, execute NAME or delete NAME")
        repo = yield self._current_repo(chat)
        if sub == "list":
            yield self.publish(chat, "bp.list", repo=repo)
        elif sub == "create":
            wanted = ays_repos.blueprint_name(name) if name else None
            if rest.strip() and wanted:
                yield self._create_blueprint(chat, repo, wanted, rest)
            else:
                self.awaiting_blueprint[chat.user_id] = (repo, wanted)
                yield self.reply(chat, f"Send the blueprint for repository {repo}: paste its YAML, or send a "
                                       ".yaml file." if wanted else
                                 f"Send the blueprint for repository {repo} as a .yaml file, or send "
                                 "/blueprint create NAME with the YAML on the lines below it.")
        elif not name:
            names = sorted((yield self._repo_snapshot(repo)).blueprints)
            if not names:
                raise CommandError(f"Repository {repo} has no blueprints yet.")
            yield self.reply(chat, f"Which blueprint shall I {sub}?", [(n, f"/blueprint {sub} {n}") for n in names])
        else:
            yield self.publish(chat, {"show": "bp.show", "execute": "bp.execute", "delete": "bp.delete"}[sub],
                               repo=repo, name=ays_repos.blueprint_name(name))

    @inlineCallbacks
    def _create_blueprint(self, chat: Chat, repo: str, name: str, content: str) -> Generator[Deferred[Any], Any, None]:
        name = ays_repos.blueprint_name(name)
        if len(content.encode()) > ays_repos.MAX_BLUEPRINT:
            raise CommandError(f"The blueprint is larger than {ays_repos.MAX_BLUEPRINT} bytes.")
        # a YAML mistake is answered here, with its line; parsing a big one is no work for the reactor
        yield self._in_thread(ays_repos.parse_blueprint, content)
        self.awaiting_blueprint.pop(chat.user_id, None)
        yield self.publish(chat, "bp.create", repo=repo, name=name, content=content)

    @inlineCallbacks
    def _document(self, chat: Chat, document: dict[str, Any], caption: str) -> Generator[Deferred[Any], Any, None]:
        words = caption.split()
        name = document.get("file_name") or ""
        if len(words) >= 3 and words[0].split("@")[0] in ("/blueprint", "/bp") and words[1] == "create":
            name = words[2]
        elif not name.endswith((".yaml", ".yml")):
            raise CommandError("I take files only as blueprints: send a .yaml file.")
        awaiting = self.awaiting_blueprint.get(chat.user_id)
        repo = awaiting[0] if awaiting else (yield self._current_repo(chat))
        size = document.get("file_size")
        if isinstance(size, int) and size > ays_repos.MAX_BLUEPRINT:
            raise CommandError(f"The blueprint is larger than {ays_repos.MAX_BLUEPRINT} bytes.")
        try:
            raw = yield self.api.download(document["file_id"], ays_repos.MAX_BLUEPRINT)
        except BadToken:
            raise
        except TelegramError as exc:
            raise CommandError(f"I could not fetch the file from Telegram ({exc.description}); please send "
                               "it again.") from None
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("The file is not UTF-8 text: a blueprint is YAML text.") from None
        yield self._create_blueprint(chat, repo, name, content)

    @inlineCallbacks
    def _service(self, chat: Chat, args: list[str]) -> Generator[Deferred[Any], Any, None]:
        sub = args[0].lower() if args else ""
        if sub == "":
            yield self.reply(chat, "Services: what shall I do?",
                             [("List", "/service list"), ("Show", "/service show"),
                              ("Execute", "/service execute")])
            return
        if sub not in ("list", "show", "execute"):
            raise CommandError("/service list [ROLE], show KEY or execute KEY ACTION")
        repo = yield self._current_repo(chat)
        if sub == "list":
            extra: dict[str, Any] = {"role": args[1]} if len(args) > 1 else {}
            yield self.publish(chat, "service.list", repo=repo, **extra)
            return
        key = args[1] if len(args) > 1 else ""
        if key:
            self._check_key(key)
        if sub == "show":
            if not key:
                yield self._choose_service(chat, repo, "show", roles=False)
            else:
                yield self.publish(chat, "service.show", repo=repo, name=key)
            return
        if not key:
            yield self._choose_service(chat, repo, "execute", roles=True)
        elif len(args) < 3:
            yield self._choose_action(chat, repo, key)
        elif key.startswith("@"):
            # every service of the role: one event each, so each gets its own run and answer
            snapshot = yield self._repo_snapshot(repo)
            keys = sorted(k for k, s in snapshot.services.items() if s.role == key[1:])
            if not keys:
                raise CommandError(f"Repository {repo} has no service of role {key[1:]}.")
            for index, one in enumerate(keys):
                yield self.publish(chat, "service.execute", _index=index, repo=repo, name=one, action=args[2])
        else:
            yield self.publish(chat, "service.execute", repo=repo, name=key, action=args[2])

    @staticmethod
    def _check_key(key: str) -> None:
        if key.startswith("@"):
            ays_repos.check_name(key[1:], "role")
        else:
            ays_repos.split_key(key)

    @inlineCallbacks
    def _choose_service(self, chat: Chat, repo: str, sub: str, roles: bool) -> Generator[Deferred[Any], Any, None]:
        snapshot = yield self._repo_snapshot(repo)
        keys = sorted(snapshot.services)
        if not keys:
            raise CommandError(f"Repository {repo} has no services yet: /blueprint execute NAME makes them.")
        buttons = [(key, f"/service {sub} {key}") for key in keys]
        if roles:
            role_names = sorted({snapshot.services[k].role for k in keys})
            buttons += [(f"@{role} (all)", f"/service {sub} @{role}") for role in role_names]
        yield self.reply(chat, f"Which service shall I {sub}?", buttons)

    @inlineCallbacks
    def _choose_action(self, chat: Chat, repo: str, key: str) -> Generator[Deferred[Any], Any, None]:
        snapshot = yield self._repo_snapshot(repo)
        if key.startswith("@"):
            records = [s for s in snapshot.services.values() if s.role == key[1:]]
        else:
            records = [snapshot.services[key]] if key in snapshot.services else []
        if not records:
            raise CommandError(f"There is no service {key} in repository {repo}.")
        actions = sorted({a for s in records if s.template in snapshot.templates
                          for a in snapshot.templates[s.template].actions})
        if not actions:
            raise CommandError(f"The template of {key} has no actions.")
        yield self.reply(chat, f"Which action of {key}?", [(a, f"/service execute {key} {a}") for a in actions])


# ---------------------------------------------------------------------------
# notices
# ---------------------------------------------------------------------------

GROUP_BUTTON = re.compile(r"^g:([acs]):([ea]):([0-9a-f]{32})$")
KIND_LETTER = {"eco": "e", "alarm": "a"}
LETTER_KIND = {"e": "eco", "a": "alarm"}
DID = {"a": "Acked", "c": "Closed", "s": "Silenced for 1 h"}
NOT_ALLOWED = "Only the cockpit's allowed users can do that."


def group_buttons(kind: str, group: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Ack, Close and Silence 1h for an open group. The callback data names the group (under 64 bytes);
    what the buttons act on is the group itself, kept by the cockpit."""
    if group.get("state") in ("resolved", "closed", "CLOSED"):
        return None
    ref = f"{KIND_LETTER[kind]}:{group['id']}"
    return inline_keyboard([("Ack", f"g:a:{ref}"), ("Close", f"g:c:{ref}"), ("Silence 1h", f"g:s:{ref}")],
                           columns=3)


class TelegramNotices:
    """The Telegram channel of :class:`cockpit.notices.Notifier`: each notice to every ``notify_chats``.

    A chat that refuses it (blocked the bot, does not exist) is logged and skipped; a Bot API that
    cannot be reached fails the notice, which is tried again.
    """

    def __init__(self, sender: "MessageSender", chats: Sequence[Any]):
        self.sender = sender
        self.chats = list(chats)

    @inlineCallbacks
    def notify(self, kind: str, group: dict[str, Any], reason: str) -> Generator[Deferred[Any], Any, None]:
        from cockpit.notices import notice_text

        text, keyboard = notice_text(kind, group, reason), group_buttons(kind, group)
        for chat in self.chats:
            try:
                yield self.sender.send(chat, text, keyboard)
            except (ApiUnreachable, RetryAfter):
                raise
            except TelegramError as exc:
                log.warn("notice for {kind} group {id} refused by chat {chat}: {error}", kind=kind,
                         id=group["id"], chat=chat, error=exc)


# ---------------------------------------------------------------------------
# the bot
# ---------------------------------------------------------------------------

def _http_client(reactor: Any) -> tuple[Any, Any]:
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
    pool.maxPersistentPerHost = 4
    pool.retryAutomatically = False  # a getUpdates must not be sent twice behind our back
    # Twisted's own, unannotated
    return treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=10)), pool  # type: ignore[no-untyped-call]


class TelegramBot(MultiService):
    """The bot for ``[bot] token``: poller, output consumer and notices, as one service.

    ``http`` (a treq client) and ``clock`` may be injected; otherwise a pooled client on
    ``reactor`` is made, and closed when the service stops.
    """

    def __init__(self, cfg: Config, backend: "Backend", reactor: Any, http: Any = None,
                 clock: Optional[IReactorTime] = None, lease_ttl: float = 30.0,
                 output_max_age: float = 3600.0, catalog: Optional[Catalog] = None,
                 groups: Any = None, silences: Any = None):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        if cfg.bot.token is None:
            raise ValueError("[bot] token is not set")
        clock = clock or reactor
        self.clock = clock
        pool = None
        if http is None:
            http, pool = _http_client(reactor)
        self.api = BotApi(cfg.bot.token, cfg.bot.api_url, http, clock, pool=pool)
        self.bus = bus = backend.bus
        self.sender = MessageSender(self.api, clock)
        self.state = backend.bot_state(self.api.bot_id)
        lease = backend.lease(self.api.bot_id, clock, lease_ttl)
        if catalog is None:  # a bot on its own: a view of the catalog of its own, started and stopped with it
            catalog = Catalog(backend.catalog_store(cfg.repos_dir, cfg.data_dir, clock), clock)
            catalog.setName("ays-catalog")  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
            catalog.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.catalog = catalog
        self.commands = ChatCommands(self.api, self.sender, bus, self.state, cfg.bot.allowed_users, catalog,
                                     clock, groups=groups, silences=silences)
        self.poller = UpdatePoller(self.api, self.state, self.commands.handle_update, clock, lease=lease)
        self.poller.setName("telegram-poller")  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.poller.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.output_max_age = output_max_age
        self._progress: dict[str, int] = {}
        self.output = bus.consumer(OUTPUT_GROUP, self.deliver, types=["telegram"])
        self.output.setName("telegram-output")  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.output.setServiceParent(self)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.notify_chats = list(cfg.bot.notify_chats)
        self.notices = TelegramNotices(self.sender, self.notify_chats)
        if not cfg.bot.allowed_users:
            log.warn("[bot] allowed_users is empty: the Telegram bot refuses every command")

    def startService(self) -> None:
        log.info("Telegram bot {bot} on {url}", bot=self.api.bot_id, url=self.api.api_url)
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        yield super().stopService()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        yield self.api.close()

    def health(self) -> dict[str, Any]:
        """What the bot is doing: polling, waiting (and why), on standby, or stopped."""
        status = self.poller.status
        return {"ok": not status.startswith("stopped") or not self.running, "status": status,
                "bot": self.api.bot_id, "handled": self.poller.handled, "offset": self.poller.offset}

    # -- output -------------------------------------------------------------------
    @inlineCallbacks
    def deliver(self, event: Event, delivery: Delivery) -> Generator[Deferred[Any], Any, None]:
        """Send an output ``message`` event to its chat; other telegram events are not ours."""
        if not isinstance(event, TelegramEvent) or event.io != "output" or event.action != "message":
            return
        args = event.args
        chat_id, text = args.get("chat_id"), args.get("msg")
        if chat_id is None or not isinstance(text, str):
            log.warn("telegram output {guid} has no args.chat_id or no args.msg text; dropped", guid=event.guid)
            return
        age = self.clock.seconds() - event.epoch
        if age > self.output_max_age:
            log.warn("telegram output {guid} is {age:.0f} s old; dropped", guid=event.guid, age=age)
            return
        key = f"{delivery.stream}/{delivery.id}"
        try:
            yield self.sender.send(chat_id, text, self._keyboard(args.get("keyboard")),
                                   skip=self._progress.get(key, 0),
                                   progress=lambda n: self._progress.__setitem__(key, n))
        except (ApiUnreachable, RetryAfter):
            raise  # left pending: sent again later, from the first piece not yet sent
        except TelegramError as exc:
            # a wrong chat, a bot blocked by the user: no retry changes that
            log.warn("telegram output {guid} to chat {chat} refused: {error}; dropped",
                     guid=event.guid, chat=chat_id, error=exc)
        self._progress.pop(key, None)

    @staticmethod
    def _keyboard(rows: Any) -> Optional[dict[str, Any]]:
        # optional args.keyboard: [[label, command], ...] buttons that run commands when tapped
        if not isinstance(rows, list):
            return None
        buttons = [(str(b[0]), str(b[1])) for b in rows if isinstance(b, (list, tuple)) and len(b) == 2]
        return inline_keyboard(buttons) if buttons else None
