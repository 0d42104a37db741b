"""A client of the Telegram Bot API over treq, with typed errors and bounded reads.

Every call is ``POST <api_url>/bot<token>/<method>`` with a JSON body; files come from
``GET <api_url>/file/bot<token>/<file_path>``. A whole call (headers and body) is bounded
in time by the injected clock and in size by ``max_body``. The token never appears in a
log line or an exception message.
"""
from __future__ import annotations

import json
from typing import Any, Generator, Optional, TypeVar, cast

from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import IResponse

log = Logger()

_T = TypeVar("_T")

#: getUpdates waits this long on the server for updates (seconds).
POLL_TIMEOUT = 30
#: a reply to a call is bounded: 100 updates of big messages fit many times over.
MAX_REPLY_BYTES = 16 * 1024 * 1024
#: what one call may take beyond the server's own long-poll wait.
CALL_TIMEOUT = 15.0


class TelegramError(Exception):
    """The Bot API refused or could not serve a call; ``str()`` says which call and why."""

    error_code: Optional[int] = None

    def __init__(self, method: str, description: str, error_code: Optional[int] = None):
        super().__init__(f"{method}: {description}")
        self.method = method
        self.description = description
        if error_code is not None:
            self.error_code = error_code


class BadToken(TelegramError):
    """401: the token is wrong or revoked; no retry will help."""

    error_code = 401


class Conflict(TelegramError):
    """409: another getUpdates for this token, or a webhook, is active."""

    error_code = 409


class RetryAfter(TelegramError):
    """429: flood control; wait ``retry_after`` seconds before the next call."""

    error_code = 429

    def __init__(self, method: str, description: str, retry_after: float):
        super().__init__(method, description)
        self.retry_after = retry_after


class BadRequest(TelegramError):
    """400 (or 403, 404): the call itself is wrong; repeating it gives the same answer."""


class ApiUnreachable(TelegramError):
    """The network failed, the call timed out, or the server answered 5xx or garbage: worth a retry."""


class BodyTooLarge(Exception):
    pass


class _BoundedBody(Protocol):
    """Collects a response body up to ``limit`` bytes, and drops the connection past it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self._producer().stopProducing()

    def _producer(self) -> IPushProducer:
        # deliverBody's transport is a push producer; Protocol types it only as an ITransport
        return cast(IPushProducer, self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self.size > self.limit:
            return  # already over: the rest is dropped until the connection ends
        self.size += len(data)
        if self.size > self.limit:
            self.parts = []
            self._producer().stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # fired only now, so the connection has settled (back in its pool or closed) by then
        if self.done.called:
            return
        if self.size > self.limit:
            self.done.errback(BodyTooLarge(f"the reply is over {self.limit} bytes"))
        elif reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """Fires with the body of ``response`` as bytes, or fails with BodyTooLarge past ``limit``."""
    collector = _BoundedBody(limit)
    response.deliverBody(collector)  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
    return collector.done


def bot_id(token: str) -> str:
    """The public part of a token (``123:abc`` -> ``123``): safe to name Redis keys and files after."""
    return token.split(":", 1)[0]


class BotApi:
    """The Bot API for one token.

    ``http`` is a treq ``HTTPClient`` (or ``treq.testing.StubTreq``); ``pool``, when given, is
    the connection pool :meth:`close` shuts.
    """

    def __init__(self, token: str, api_url: str, http: Any, clock: IReactorTime,
                 pool: Any = None, max_reply: int = MAX_REPLY_BYTES, call_timeout: float = CALL_TIMEOUT):
        self._token = token
        self.bot_id = bot_id(token)
        self.api_url = api_url.rstrip("/")
        self.http = http
        self.clock = clock
        self.pool = pool
        self.max_reply = max_reply
        self.call_timeout = call_timeout

    def __repr__(self) -> str:
        return f"<BotApi bot {self.bot_id} at {self.api_url}>"

    # -- plumbing ---------------------------------------------------------------
    def _bounded(self, d: Deferred[_T], seconds: float, method: str) -> Deferred[_T]:
        """``d``, cancelled after ``seconds`` on the injected clock and then failing as ApiUnreachable."""
        timer = self.clock.callLater(seconds, d.cancel)
        timed_out = [False]

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            else:
                timed_out[0] = True
            return result

        def translate(failure: Failure) -> Any:
            if failure.check(CancelledError) and timed_out[0]:
                raise ApiUnreachable(method, f"no complete answer within {seconds:g} s")
            return failure

        return d.addBoth(settle).addErrback(translate)

    def call(self, method: str, params: Optional[dict[str, Any]] = None,
             timeout: Optional[float] = None) -> Deferred[Any]:
        """Call ``method``; fires with its ``result`` or fails with a :class:`TelegramError`.

        The returned Deferred can be cancelled (the request is then aborted).
        """
        d = self._call(method, params or {})
        return self._bounded(d, timeout if timeout is not None else self.call_timeout, method)

    @inlineCallbacks
    def _call(self, method: str, params: dict[str, Any]) -> Generator[Deferred[Any], Any, Any]:
        url = f"{self.api_url}/bot{self._token}/{method}"
        try:
            response = yield self.http.post(url, json=params)
            body = yield read_body(response, self.max_reply)
        except CancelledError:
            raise
        except BodyTooLarge as exc:
            raise ApiUnreachable(method, str(exc)) from None
        except Exception as exc:
            if _cancelled(exc):
                raise CancelledError() from None
            # connection refused, reset, DNS...: say what, never where (the URL holds the token)
            raise ApiUnreachable(method, f"network failure: {type(exc).__name__}: {_safe(exc, self._token)}") from None
        return self._result(method, response.code, body)

    def _result(self, method: str, code: int, body: bytes) -> Any:
        try:
            envelope = json.loads(body)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or "ok" not in envelope:
            # a proxy or gateway page (502, 504, ...): Telegram itself always answers JSON
            raise ApiUnreachable(method, f"HTTP {code} without a Bot API answer")
        if envelope["ok"] is True:
            return envelope.get("result")
        description = str(envelope.get("description") or f"HTTP {code}")
        error_code = envelope.get("error_code", code)
        if error_code == 401:
            raise BadToken(method, description)
        if error_code == 409:
            raise Conflict(method, description)
        if error_code == 429:
            parameters = envelope.get("parameters") or {}
            retry_after = parameters.get("retry_after", 1)
            try:
                retry_after = max(float(retry_after), 0.0)
            except (TypeError, ValueError):
                retry_after = 1.0
            raise RetryAfter(method, description, retry_after)
        if isinstance(error_code, int) and error_code >= 500:
            raise ApiUnreachable(method, description, error_code)
        raise BadRequest(method, description, error_code if isinstance(error_code, int) else code)

    # -- methods ------------------------------------------------------------------
    def get_updates(self, offset: Optional[int], timeout: int = POLL_TIMEOUT,
                    allowed_updates: tuple[str, ...] = ("message", "callback_query"),
                    limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        """Long-poll for updates from ``offset`` on; fires with a list of update dicts."""
        params: dict[str, Any] = {"timeout": timeout, "limit": limit,
                                  "allowed_updates": list(allowed_updates)}
        if offset is not None:
            params["offset"] = offset
        return self.call("getUpdates", params, timeout=timeout + self.call_timeout)

    def send_message(self, chat_id: Any, text: str, parse_mode: Optional[str] = "HTML",
                     reply_markup: Optional[dict[str, Any]] = None) -> Deferred[dict[str, Any]]:
        params: dict[str, Any] = {"chat_id": chat_id, "text": text,
                                  "link_preview_options": {"is_disabled": True}}
        if parse_mode:
            params["parse_mode"] = parse_mode
        if reply_markup is not None:
            params["reply_markup"] = reply_markup
        return self.call("sendMessage", params)

    def answer_callback_query(self, callback_query_id: str, text: Optional[str] = None) -> Deferred[bool]:
        params: dict[str, Any] = {"callback_query_id": callback_query_id}
        if text:
            params["text"] = text
        return self.call("answerCallbackQuery", params)

    def edit_message_text(self, chat_id: Any, message_id: int, text: str, parse_mode: Optional[str] = "HTML",
                          reply_markup: Optional[dict[str, Any]] = None) -> Deferred[Any]:
        """Replace the text (and keyboard) of a message the bot sent."""
        params: dict[str, Any] = {"chat_id": chat_id, "message_id": message_id, "text": text,
                                  "link_preview_options": {"is_disabled": True}}
        if parse_mode:
            params["parse_mode"] = parse_mode
        if reply_markup is not None:
            params["reply_markup"] = reply_markup
        return self.call("editMessageText", params)

    def remove_keyboard(self, chat_id: Any, message_id: int) -> Deferred[Any]:
        """Take the inline keyboard off a message the bot sent (editMessageReplyMarkup)."""
        return self.call("editMessageReplyMarkup", {"chat_id": chat_id, "message_id": message_id,
                                                    "reply_markup": {"inline_keyboard": []}})

    @inlineCallbacks
    def download(self, file_id: str, limit: int) -> Generator[Deferred[Any], Any, bytes]:
        """Fires with the bytes of a file sent to the bot (getFile, then the download)."""
        info = yield self.call("getFile", {"file_id": file_id})
        size = info.get("file_size")
        if isinstance(size, int) and size > limit:
            raise BadRequest("getFile", f"the file is {size} bytes, over the {limit} bytes allowed")
        path = info.get("file_path")
        if not path:
            raise BadRequest("getFile", "Telegram gave no file_path (is the file over 20 MB?)")
        url = f"{self.api_url}/file/bot{self._token}/{path}"
        d = self._download(url, limit)
        content: bytes = yield self._bounded(d, self.call_timeout, "download")
        return content

    @inlineCallbacks
    def _download(self, url: str, limit: int) -> Generator[Deferred[Any], Any, bytes]:
        try:
            response = yield self.http.get(url)
            if response.code != 200:
                body: bytes = yield read_body(response, 64 * 1024)
                raise BadRequest("download", f"HTTP {response.code}: {body[:200].decode('utf-8', 'replace')}",
                                 response.code)
            body = yield read_body(response, limit)
        except (CancelledError, TelegramError):
            raise
        except BodyTooLarge:
            raise BadRequest("download", f"the file is over the {limit} bytes allowed") from None
        except Exception as exc:
            if _cancelled(exc):
                raise CancelledError() from None
            raise ApiUnreachable("download", f"network failure: {type(exc).__name__}: "
                                             f"{_safe(exc, self._token)}") from None
        return body

    def close(self) -> Deferred[None]:
        """Close the connection pool this client owns (if any)."""
        if self.pool is None:
            return defer.succeed(None)
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


def _cancelled(exc: BaseException) -> bool:
    """Whether a twisted.web client failure is our own cancellation, wrapped."""
    if isinstance(exc, ConnectingCancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(CancelledError, ConnectingCancelledError) for r in reasons)


def _safe(exc: BaseException, token: str) -> str:
    return str(exc).replace(token, "<token>")
