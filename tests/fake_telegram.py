"""A local fake of the Telegram Bot API: a Twisted web resource that behaves like the real one.

It serves ``/bot<token>/<method>`` and ``/file/bot<token>/<file_path>`` with Telegram's JSON
envelope (``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code": N, "description": ...}``),
and keeps Telegram's rules where the cockpit depends on them:

- ``getUpdates`` long-polls: it answers at once when updates are there, else holds the request
  up to ``timeout`` seconds (on an injectable clock) and answers as soon as one arrives;
  ``offset`` confirms every update below it (a negative offset keeps only the last ones);
  ``allowed_updates`` filters and is remembered; a second ``getUpdates`` for the token ends
  the one being held with 409 Conflict.
- ``sendMessage`` checks ``parse_mode`` HTML (unknown tags and bare ``<`` are refused, as
  Telegram does) and the 4096-character limit on the text after entity parsing; messages
  sent are recorded with the text a user would see.
- ``answerCallbackQuery`` (with its optional ``text``), ``editMessageText`` (the same checks as
  ``sendMessage``, and "message is not modified" when nothing changes), ``editMessageReplyMarkup``,
  ``getFile`` and file download.
- a wrong token gets 401; ``fail_next()`` makes a method answer 429 with ``retry_after``
  (or any other error) on demand.

Tests inject updates with :meth:`FakeTelegram.message`, :meth:`document` and :meth:`callback`,
and read :attr:`sent`, :attr:`calls`, :attr:`answered` and :attr:`edited`.
"""
from __future__ import annotations

import html
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

MAX_TEXT = 4096
CONFLICT = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
UPDATE_KINDS = ("message", "edited_message", "channel_post", "edited_channel_post", "inline_query",
                "chosen_inline_result", "callback_query", "shipping_query", "pre_checkout_query", "poll",
                "poll_answer", "my_chat_member", "chat_member", "chat_join_request")
# the tags Telegram's HTML parse mode knows
HTML_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a",
             "code", "pre", "blockquote", "tg-emoji"}
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s[^<>]*)?)>")
_ENTITY = re.compile(r"&(lt|gt|amp|quot|#[0-9]+|#x[0-9a-fA-F]+);")


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: Optional[dict[str, Any]] = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


def visible_text(text: str) -> str:
    """What a user sees of ``text`` sent with parse_mode HTML; ApiError 400 where Telegram refuses it."""
    out: list[str] = []
    open_tags: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "<":
            match = _TAG.match(text, i)
            offset = len(text[:i].encode())
            if not match:
                raise ApiError(400, "Bad Request: can't parse entities: Unexpected end of name token "
                                    f"at byte offset {offset}")
            closing, name = match.group(1), match.group(2).lower()
            if name not in HTML_TAGS:
                raise ApiError(400, f'Bad Request: can\'t parse entities: Unsupported start tag "{name}" '
                                    f"at byte offset {offset}")
            if closing:
                if not open_tags or open_tags[-1] != name:
                    raise ApiError(400, f'Bad Request: can\'t parse entities: Unmatched end tag at byte '
                                        f'offset {offset}, expected "</{open_tags[-1] if open_tags else ""}>", '
                                        f'found "</{name}>"')
                open_tags.pop()
            else:
                open_tags.append(name)
            i = match.end()
        elif ch == "&":
            match = _ENTITY.match(text, i)
            if match:
                out.append(html.unescape(match.group(0)))
                i = match.end()
            else:  # Telegram takes a lone ampersand literally
                out.append(ch)
                i += 1
        elif ch == ">":
            out.append(ch)
            i += 1
        else:
            out.append(ch)
            i += 1
    if open_tags:
        raise ApiError(400, "Bad Request: can't parse entities: Can't find end tag corresponding to "
                            f"start tag \"{open_tags[-1]}\"")
    return "".join(out)


@dataclass
class User:
    id: int
    username: Optional[str] = None
    first_name: str = "Test"

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "is_bot": False, "first_name": self.first_name}
        if self.username:
            data["username"] = self.username
        return data


@dataclass
class _Poll:
    request: Request
    params: dict[str, Any]
    timer: Any = None


@dataclass
class _Failure:
    code: int
    description: str
    retry_after: Optional[int] = None
    gateway_page: bool = False


@dataclass
class _Waiter:
    method: str
    count: int
    deferred: Deferred = field(default_factory=Deferred)


class FakeTelegram(Resource):
    """The Bot API for one bot token."""

    isLeaf = True

    def __init__(self, token: str = "123456:TEST-fake-token", clock: Optional[IReactorTime] = None,
                 first_update_id: int = 700000):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock = clock
        self.token = token
        self.bot = {"id": int(token.split(":")[0]), "is_bot": True, "first_name": "Cockpit",
                    "username": "cockpit_test_bot"}
        self.updates: list[dict[str, Any]] = []  # not yet confirmed, oldest first
        self._update_ids = itertools.count(first_update_id)
        self._message_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._callback_ids = itertools.count(1)
        self.allowed_updates: Optional[list[str]] = None
        self._poll: Optional[_Poll] = None
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id -> (file_path, content)
        self.callbacks: dict[str, dict[str, Any]] = {}  # open callback queries
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # messages the bot sent, by (chat, id)
        self.sent: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []
        self.edited: list[dict[str, Any]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.conflicts = 0
        self._failures: dict[str, list[_Failure]] = {}
        self._waiters: list[_Waiter] = []

    # -- what tests do ---------------------------------------------------------------
    def site(self) -> Site:
        site = Site(self)
        site.noisy = False
        site.log = lambda request: None  # no access log: the URLs hold the token
        return site

    def message(self, user: User, text: str, chat_id: Optional[int] = None) -> dict[str, Any]:
        """A user writes ``text`` to the bot (in a private chat unless ``chat_id`` says otherwise)."""
        msg = self._user_message(user, chat_id)
        msg["text"] = text
        if text.startswith("/"):
            msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        return self.add_update({"message": msg})

    def document(self, user: User, file_name: str, content: bytes, caption: Optional[str] = None,
                 mime_type: str = "application/x-yaml", chat_id: Optional[int] = None) -> dict[str, Any]:
        """A user sends a file."""
        number = next(self._file_ids)
        file_id = f"BQACAgQAAx{number:08d}"
        self.files[file_id] = (f"documents/file_{number}.{file_name.rsplit('.', 1)[-1]}", content)
        msg = self._user_message(user, chat_id)
        msg["document"] = {"file_name": file_name, "mime_type": mime_type, "file_id": file_id,
                           "file_unique_id": f"AgAD{number:04d}", "file_size": len(content)}
        if caption is not None:
            msg["caption"] = caption
        return self.add_update({"message": msg})

    def callback(self, user: User, message: dict[str, Any], data: str) -> dict[str, Any]:
        """A user taps the inline button with ``data`` on ``message`` (one the bot sent)."""
        query_id = str(4000000000 + next(self._callback_ids))
        query = {"id": query_id, "from": user.as_dict(), "message": message,
                 "chat_instance": "-1000", "data": data}
        self.callbacks[query_id] = query
        return self.add_update({"callback_query": query})

    def add_update(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **body}
        self.updates.append(update)
        if self._poll is not None and self._select(self._poll.params):
            poll, self._poll = self._poll, None
            if poll.timer is not None and poll.timer.active():
                poll.timer.cancel()
            self._answer_updates(poll.request, poll.params)
        return update

    def fail_next(self, method: str, code: int = 429, description: Optional[str] = None,
                  retry_after: Optional[int] = None, times: int = 1, gateway_page: bool = False) -> None:
        """The next ``times`` calls of ``method`` fail with ``code`` (429: with ``retry_after``)."""
        if code == 429 and retry_after is None:
            retry_after = 5
        if description is None:
            description = {429: f"Too Many Requests: retry after {retry_after}",
                           502: "Bad Gateway", 500: "Internal Server Error"}.get(code, "Bad Request")
        self._failures.setdefault(method, []).extend(
            [_Failure(code, description, retry_after, gateway_page)] * times)

    def wait_for(self, method: str, count: int) -> Deferred:
        """Fires once ``method`` has been called ``count`` times in all."""
        if self.count(method) >= count:
            return defer.succeed(None)
        waiter = _Waiter(method, count)
        self._waiters.append(waiter)
        return waiter.deferred

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)

    def sent_to(self, chat_id: int) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["chat_id"] == chat_id]

    @property
    def polling(self) -> bool:
        """Whether a getUpdates is being held now."""
        return self._poll is not None

    def close(self) -> None:
        """End a held getUpdates (as the server would when shutting down)."""
        if self._poll is not None:
            poll, self._poll = self._poll, None
            if poll.timer is not None and poll.timer.active():
                poll.timer.cancel()
            self._send(poll.request, {"ok": True, "result": []})

    # -- serving ----------------------------------------------------------------------
    def render(self, request: Request) -> Any:
        path = request.path.decode()
        parts = path.strip("/").split("/", 1)
        if parts[0] == "file" and len(parts) == 2:
            return self._download(request, parts[1])
        if len(parts) != 2 or not parts[0].startswith("bot"):
            return self._error(request, ApiError(404, "Not Found"))
        token, method = parts[0][3:], parts[1]
        if token != self.token:
            return self._error(request, ApiError(401, "Unauthorized"))
        try:
            params = self._params(request)
        except ValueError:
            return self._error(request, ApiError(400, "Bad Request: can't parse JSON object"))
        self.calls.append((method, params))
        try:
            return self._serve(request, method, params)
        finally:
            self._notify_waiters()  # after the call took effect (a long poll is held by now)

    def _serve(self, request: Request, method: str, params: dict[str, Any]) -> Any:
        failures = self._failures.get(method)
        if failures:
            failure = failures.pop(0)
            if failure.gateway_page:
                request.setResponseCode(failure.code)
                request.setHeader(b"content-type", b"text/html")
                return f"<html><body><h1>{failure.code} {failure.description}</h1></body></html>".encode()
            parameters = {"retry_after": failure.retry_after} if failure.retry_after is not None else None
            return self._error(request, ApiError(failure.code, failure.description, parameters))
        handler = getattr(self, "_api_" + method, None)
        if handler is None:
            return self._error(request, ApiError(404, "Not Found"))
        try:
            result = handler(request, params)
        except ApiError as exc:
            return self._error(request, exc)
        if result is NOT_DONE_YET:
            return result
        return self._ok(request, result)

    def _params(self, request: Request) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key, values in (request.args or {}).items():
            params[key.decode()] = values[-1].decode()
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip()
        body = request.content.read() if request.content is not None else b""
        if content_type == "application/json" and body:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            params.update(data)
        elif content_type == "application/x-www-form-urlencoded" and body:
            for key, values in parse_qs(body.decode()).items():
                params[key] = values[-1]
        for key in ("allowed_updates", "reply_markup"):  # form posts carry these as JSON text
            if isinstance(params.get(key), str):
                params[key] = json.loads(params[key])
        return params

    def _ok(self, request: Request, result: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"ok": True, "result": result}).encode()

    def _error(self, request: Request, exc: ApiError) -> bytes:
        request.setResponseCode(exc.code)
        request.setHeader(b"content-type", b"application/json")
        body: dict[str, Any] = {"ok": False, "error_code": exc.code, "description": exc.description}
        if exc.parameters:
            body["parameters"] = exc.parameters
        return json.dumps(body).encode()

    def _send(self, request: Request, body: dict[str, Any]) -> None:
        if request.finished or request._disconnected:
            return
        if not body["ok"]:
            request.setResponseCode(body["error_code"])
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(body).encode())
        request.finish()

    def _notify_waiters(self) -> None:
        for waiter in list(self._waiters):
            if self.count(waiter.method) >= waiter.count:
                self._waiters.remove(waiter)
                waiter.deferred.callback(None)

    # -- getUpdates ----------------------------------------------------------------------
    @staticmethod
    def _int(params: dict[str, Any], name: str, default: int) -> int:
        value = params.get(name, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ApiError(400, f"Bad Request: invalid {name} specified") from None

    def _confirm(self, offset: int) -> None:
        if offset > 0:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        elif offset < 0:
            self.updates = self.updates[offset:]

    def _select(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        limit = max(1, min(self._int(params, "limit", 100), 100))
        allowed = self.allowed_updates
        chosen = [u for u in self.updates if allowed is None or any(k in u for k in allowed)]
        return chosen[:limit]

    def _api_getUpdates(self, request: Request, params: dict[str, Any]) -> Any:
        if self._poll is not None:
            # Telegram ends the request it holds and serves the newer one
            old, self._poll = self._poll, None
            if old.timer is not None and old.timer.active():
                old.timer.cancel()
            self.conflicts += 1
            self._send(old.request, {"ok": False, "error_code": 409, "description": CONFLICT})
        self._confirm(self._int(params, "offset", 0))
        allowed = params.get("allowed_updates")
        if allowed is not None:
            if not isinstance(allowed, list) or any(k not in UPDATE_KINDS for k in allowed):
                raise ApiError(400, "Bad Request: wrong allowed_updates specified")
            # an empty list means "all but a few", as before; Telegram keeps the last setting
            self.allowed_updates = allowed or None
        # updates the bot said it does not want are dropped, not kept for later
        if self.allowed_updates is not None:
            self.updates = [u for u in self.updates if any(k in u for k in self.allowed_updates)]
        timeout = self._int(params, "timeout", 0)
        if self._select(params) or timeout <= 0:
            return self._select(params)
        poll = _Poll(request, params)
        poll.timer = self.clock.callLater(timeout, self._poll_expired, poll)
        self._poll = poll
        request.notifyFinish().addErrback(self._poll_gone, poll)
        return NOT_DONE_YET

    def _answer_updates(self, request: Request, params: dict[str, Any]) -> None:
        self._send(request, {"ok": True, "result": self._select(params)})

    def _poll_expired(self, poll: _Poll) -> None:
        if self._poll is poll:
            self._poll = None
            self._answer_updates(poll.request, poll.params)

    def _poll_gone(self, _: Any, poll: _Poll) -> None:
        # the client went away (cancelled its long poll)
        if poll.timer is not None and poll.timer.active():
            poll.timer.cancel()
        if self._poll is poll:
            self._poll = None

    # -- methods -----------------------------------------------------------------------
    def _api_getMe(self, request: Request, params: dict[str, Any]) -> Any:
        return self.bot

    def _api_deleteWebhook(self, request: Request, params: dict[str, Any]) -> Any:
        return True

    def _api_sendMessage(self, request: Request, params: dict[str, Any]) -> Any:
        chat_id = params.get("chat_id")
        try:
            chat = int(chat_id)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ApiError(400, "Bad Request: chat not found") from None
        text, parse_mode, shown, markup = self._checked_text(params, "Bad Request: message is too long")
        message_id = next(self._message_ids)
        message = {"message_id": message_id, "from": self.bot, "chat": {"id": chat, "type": "private"},
                   "date": int(self.clock.seconds()), "text": shown}
        if markup and markup.get("inline_keyboard"):
            message["reply_markup"] = markup
        self.messages[(chat, message_id)] = message
        self.sent.append({"chat_id": chat, "text": text, "visible": shown, "parse_mode": parse_mode,
                          "reply_markup": markup, "message_id": message_id, "message": message})
        return message

    def _checked_text(self, params: dict[str, Any], too_long: str) -> tuple[str, Any, str, Any]:
        """(text, parse_mode, what a user sees, reply_markup) of a message, with Telegram's refusals:
        sendMessage and editMessageText check alike (and word a text that is too long differently)."""
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        parse_mode = params.get("parse_mode")
        if parse_mode is not None and parse_mode not in ("HTML", "Markdown", "MarkdownV2"):
            raise ApiError(400, "Bad Request: unsupported parse_mode")
        shown = visible_text(text) if parse_mode == "HTML" else text
        if len(shown) > MAX_TEXT:
            raise ApiError(400, too_long)
        markup = params.get("reply_markup")
        if markup is not None:
            self._check_markup(markup)
        return text, parse_mode, shown, markup

    @staticmethod
    def _check_markup(markup: Any) -> None:
        if not isinstance(markup, dict):
            raise ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object")
        rows = markup.get("inline_keyboard")
        if rows is None:
            return
        if not isinstance(rows, list) or any(not isinstance(row, list) for row in rows):
            raise ApiError(400, "Bad Request: field \"inline_keyboard\" of the InlineKeyboardMarkup "
                                "must be an Array of Arrays")
        for row in rows:
            for button in row:
                if not isinstance(button, dict) or not button.get("text"):
                    raise ApiError(400, "Bad Request: can't parse inline keyboard button: Text "
                                        "buttons are unallowed in the inline keyboard")
                data = button.get("callback_data")
                if data is not None and not (1 <= len(str(data).encode()) <= 64):
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")

    def _api_answerCallbackQuery(self, request: Request, params: dict[str, Any]) -> Any:
        query_id = str(params.get("callback_query_id", ""))
        if self.callbacks.pop(query_id, None) is None:
            raise ApiError(400, "Bad Request: query is too old and response timeout expired or "
                                "query ID is invalid")
        self.answered.append(params)
        return True

    def _message_to_edit(self, params: dict[str, Any]) -> dict[str, Any]:
        """The message ``chat_id`` and ``message_id`` name, as Telegram refuses an edit of one it has not."""
        try:
            key = (int(params.get("chat_id")), int(params.get("message_id")))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ApiError(400, "Bad Request: message to edit not found") from None
        message = self.messages.get(key)
        if message is None:
            raise ApiError(400, "Bad Request: message to edit not found")
        return message

    def _api_editMessageText(self, request: Request, params: dict[str, Any]) -> Any:
        message = self._message_to_edit(params)
        _, _, shown, markup = self._checked_text(params, "Bad Request: MESSAGE_TOO_LONG")
        new_markup = markup if markup and markup.get("inline_keyboard") else None
        if shown == message.get("text") and new_markup == message.get("reply_markup"):
            raise ApiError(400, "Bad Request: message is not modified: specified new message content "
                                "and reply markup are exactly the same as a current content and reply "
                                "markup of the message")
        message["text"] = shown
        if new_markup is not None:
            message["reply_markup"] = new_markup
        else:
            message.pop("reply_markup", None)
        self.edited.append({**params, "visible": shown})
        return message

    def _api_editMessageReplyMarkup(self, request: Request, params: dict[str, Any]) -> Any:
        message = self._message_to_edit(params)
        markup = params.get("reply_markup") or {}
        self._check_markup(markup)
        old = message.get("reply_markup") or {"inline_keyboard": []}
        new = markup if markup.get("inline_keyboard") else {"inline_keyboard": []}
        if old == new:
            raise ApiError(400, "Bad Request: message is not modified: specified new message content "
                                "and reply markup are exactly the same as a current content and reply "
                                "markup of the message")
        if new["inline_keyboard"]:
            message["reply_markup"] = new
        else:
            message.pop("reply_markup", None)
        self.edited.append(params)
        return message

    def _api_getFile(self, request: Request, params: dict[str, Any]) -> Any:
        file_id = str(params.get("file_id", ""))
        if file_id not in self.files:
            raise ApiError(400, "Bad Request: invalid file_id")
        path, content = self.files[file_id]
        return {"file_id": file_id, "file_unique_id": "u" + file_id[-6:], "file_size": len(content),
                "file_path": path}

    def _download(self, request: Request, rest: str) -> bytes:
        token, _, path = rest.partition("/")
        if token != "bot" + self.token:
            request.setResponseCode(401)
            return json.dumps({"ok": False, "error_code": 401, "description": "Unauthorized"}).encode()
        for file_path, content in self.files.values():
            if file_path == path:
                request.setHeader(b"content-type", b"application/octet-stream")
                return content
        request.setResponseCode(404)
        return json.dumps({"ok": False, "error_code": 404, "description": "Not Found"}).encode()

    # -- helpers -----------------------------------------------------------------------
    def _user_message(self, user: User, chat_id: Optional[int]) -> dict[str, Any]:
        chat = {"id": chat_id if chat_id is not None else user.id,
                "type": "private" if chat_id is None or chat_id == user.id else "group"}
        if chat["type"] == "private":
            chat["first_name"] = user.first_name
            if user.username:
                chat["username"] = user.username
        return {"message_id": next(self._message_ids), "from": user.as_dict(), "chat": chat,
                "date": int(self.clock.seconds())}


class _LastToKnow(ProtocolWrapper):
    def connectionLost(self, reason: Any) -> None:
        # the web server learns first (a held long poll is let go), then the factory
        self.wrappedProtocol.connectionLost(reason)
        self.factory.unregisterProtocol(self)


class _TrackingFactory(WrappingFactory):
    """Knows its open connections, and says when the last one has closed."""

    protocol = _LastToKnow

    def __init__(self, wrapped: Any):
        super().__init__(wrapped)
        self._idle: list[Deferred] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def when_idle(self) -> Deferred:
        if not self.protocols:
            return defer.succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d


class FakeTelegramServer:
    """The fake listening on a real local port, which can go down and come back on the same port."""

    def __init__(self, fake: FakeTelegram, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.fake = fake
        self.reactor = reactor
        self.factory = _TrackingFactory(fake.site())
        self.port: Any = None
        self.number = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.number}"

    def start(self) -> "FakeTelegramServer":
        """Listen (again, on the same port after a stop)."""
        self.port = self.reactor.listenTCP(self.number, self.factory, interface="127.0.0.1")
        self.number = self.port.getHost().port
        return self

    @defer.inlineCallbacks
    def stop(self):
        """Stop listening and drop every open connection: the API is down."""
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        self.fake.close()
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()
        yield self.factory.when_idle()
