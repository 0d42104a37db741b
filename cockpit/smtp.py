"""Mail: the ESMTP server that turns incoming mail into email events, and the sender of outgoing mail.

Receiving (DESIGN §2 [mail], §3 email, §4): recipients outside ``[mail] domains`` get
550 5.1.1; ``SIZE <max_size>`` is advertised and enforced while the data streams in
(552 without buffering past the limit); STARTTLS when a certificate is configured and
AUTH PLAIN/LOGIN only after it. A message is parsed with the stdlib ``email`` package
(``policy.default``) off the reactor thread, its attachments go to the store space
``attachments``, and its event is published before 250 is sent; when the bus cannot
take it the answer is 451 4.3.0, so the sending server retries.

Sending: :class:`MailSender` delivers :class:`OutgoingMail` through ``[mail.relay]``
with STARTTLS or implicit TLS and AUTH, retrying with backoff; a mail is stored in an
outbox (Redis, or a spool directory with the embedded bus) before it is accepted.
"""
from __future__ import annotations

import codecs
import functools
import hmac
import itertools
import mimetypes
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import EmailPolicy
from email.utils import format_datetime, getaddresses, make_msgid
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from markdownify import markdownify
from pydantic import BaseModel, ConfigDict, Field, field_validator
from twisted.application.service import Service
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.python.failure import Failure
from zope.interface import implementer

from cockpit.bus import Bus, BusUnavailable
from cockpit.config import MailSection, RelaySection
from cockpit.events import EmailEvent
from cockpit.outbox import Outbox, QueuedMail, SpoolOutbox, Suspended
from cockpit.store import Store

log = Logger()

ATTACHMENTS_SPACE = "attachments"
RAWDATA = "RAWDATA"  # our DATA state: the message streams in as bytes, not line by line
MAX_RECIPIENTS = 100
MAX_COMMAND_LINE = 4096  # RFC 5321 allows 512; AUTH responses are longer
MAX_WAITING = 256 << 10  # input kept while a message is handled, before reading stops
MAX_DEPTH = 32  # deeper MIME nesting is kept whole as message.eml
MAX_ATTACHMENTS = 500  # more parts than this are kept whole as message.eml
MD_SCAN = 100_000  # characters of a plain body examined for Markdown


# ---------------------------------------------------------------------------------------------
# Parsing: bytes -> EmailEvent. Runs in a thread; pure apart from the store writes.
# ---------------------------------------------------------------------------------------------

# Content-Type and friends are read several times per part while parsing, and parsing them
# with the header registry is most of policy.default's cost; their values repeat across mail
# ("text/plain; charset=utf-8"), and a parsed header is immutable, so they are memoised.
_STRUCTURAL = frozenset({"content-type", "content-transfer-encoding", "content-disposition", "mime-version"})


@functools.lru_cache(maxsize=4096)
def _structural_header(name: str, value: str) -> Any:
    return email_policy.default.header_factory(name, "".join(value.splitlines()))


class _MailPolicy(EmailPolicy):
    """policy.default, with memoised structural headers."""

    def header_fetch_parse(self, name: str, value: Any) -> Any:
        if isinstance(value, str) and len(value) < 1000 and name.lower() in _STRUCTURAL \
                and not hasattr(value, "name"):
            return _structural_header(name, value)
        return super().header_fetch_parse(name, value)


MAIL_POLICY = _MailPolicy()


class MessageRefused(Exception):
    """A message the cockpit cannot take for good: answered with ``code`` (5xx) and ``text``."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class Envelope:
    """What the SMTP dialogue said about a message, as opposed to its headers."""

    sender: str
    recipients: list[str]
    helo: str = ""
    peer: str = ""
    tls: bool = False
    user: Optional[str] = None


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Cc, less tab and line feed
_CONTROL_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f]")
_ALL_CONTROL = bytes(range(0x20)) + b"\x7f"  # the ASCII part of _CONTROL_IN_LINE
_KEPT_CONTROL = _ALL_CONTROL.replace(b"\t", b"").replace(b"\n", b"")  # and of _CONTROL


def clean_text(value: str, keep_newlines: bool = False) -> str:
    """Valid Unicode with no control characters: 8-bit bytes smuggled in as surrogates come back as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        value = value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates that were not bytes
    if keep_newlines:
        if "\r" in value:
            value = value.replace("\r\n", "\n").replace("\r", "\n")
        return value if _plain_ascii(value, _KEPT_CONTROL) else _CONTROL.sub("", value)
    if _plain_ascii(value, _ALL_CONTROL):
        return value
    return _CONTROL_IN_LINE.sub(lambda m: " " if m.group() in "\r\n\t" else "", value)


def _plain_ascii(value: str, control: bytes) -> bool:
    """ASCII with none of ``control``: most text, told apart by a C loop rather than a regex's steps."""
    if not value.isascii():
        return False
    data = value.encode("ascii")
    return len(data.translate(None, control)) == len(data)


def _raw_headers(msg: Message, name: str) -> list[str]:
    lowered = name.lower()
    return [str(v) for k, v in msg.raw_items() if k.lower() == lowered]


def _header(msg: Message, name: str) -> str:
    """A header's decoded text; the raw text when the header cannot be parsed."""
    try:
        value = msg.get(name)
        return clean_text(str(value)) if value is not None else ""
    except Exception:  # the header registry has raised on hostile input before
        raw = _raw_headers(msg, name)
        return clean_text(raw[0]) if raw else ""


# "addr@host" or "Name <addr@host>": the common forms, read without getaddresses' tokenizer
_SIMPLE_ADDRESS = re.compile(r'^\s*(?:[\w .\'-]*<([^<>@\s,;:"()\\]+@[^<>@\s,;:"()\\]+)>|([^<>@\s,;:"()\\]+@[^<>@\s,;:"()\\]+))\s*$')


def _addresses(values: Optional[list[str]]) -> list[str]:
    found: list[str] = []
    if not values:
        return found
    if len(values) == 1 and values[0].isascii():
        simple = _SIMPLE_ADDRESS.match(values[0])
        if simple:
            return [clean_text(simple.group(1) or simple.group(2))[:320]]
    try:
        pairs = getaddresses(values)
    except Exception:
        return found
    for _, address in pairs:
        address = clean_text(address).strip()
        if address and address not in found:
            found.append(address[:320])
    return found


# (a character the mark cannot do without, the mark): the cheap test spares most texts the regex
_MD_STRONG = [
    ("#", re.compile(r"^ {0,3}#{1,6}[ \t]+\S", re.M)),  # ATX heading
    ("``", re.compile(r"^ {0,3}```", re.M)),  # code fence
    ("~~", re.compile(r"^ {0,3}~~~", re.M)),
    ("](", re.compile(r"\[[^\]\n]+\]\((?:https?://|mailto:|/|#)[^)\s]*\)")),  # inline link
    ("**", re.compile(r"(?<![\w*])\*\*(?=\S)[^\n*]+(?<=\S)\*\*(?![\w*])")),  # **strong**
    ("*", re.compile(r"(?<![\w*])\*(?=[^\s*])[^\n*]+(?<=[^\s*])\*(?![\w*])")),  # *emphasis*
]
_MD_MARK_BYTES = b"#`~]*"  # every strong mark needs one of these
# a list item at the start of a line; searched in "\n" + text, since a pattern that starts with
# a literal is scanned for in C, where "^" with re.M is tried at every position
_MD_LIST_ITEM = re.compile(r"\n {0,3}(?:[-*+]|\d{1,3}[.)])[ \t]+\S")


def looks_like_markdown(text: str) -> bool:
    """Headings, fences, links, emphasis, or a list of two items or more mark a text as Markdown."""
    sample = text[:MD_SCAN]
    data = sample.encode("utf-8", "surrogatepass")  # the marks are ASCII, so they are bytes of their own in UTF-8
    if len(data.translate(None, _MD_MARK_BYTES)) != len(data) and \
            any(mark in sample and pattern.search(sample) for mark, pattern in _MD_STRONG):
        return True
    items = _MD_LIST_ITEM.finditer("\n" + sample)
    return next(items, None) is not None and next(items, None) is not None


@functools.lru_cache(maxsize=256)
def _codec(charset: str) -> str:
    try:
        return codecs.lookup(charset).name
    except (LookupError, ValueError):
        return "utf-8"


def decode_text(part: Message) -> str:
    """A text part's content; an unknown or broken charset degrades to replacement characters."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        data = _undecoded(part)
    charset = _params(part, "content-type").get("charset")
    codec = _codec(str(charset)) if charset else "utf-8"
    if codec == "ascii":
        codec = "utf-8"  # 8-bit text declared as us-ascii is UTF-8 more often than not
    try:
        text = data.decode(codec, "replace")
    except (LookupError, ValueError, TypeError):  # codecs such as rot13 or hex are no text encodings
        text = data.decode("utf-8", "replace")
    return clean_text(text, keep_newlines=True)


def safe_filename(name: Optional[str], content_type: str) -> str:
    """A decoded attachment name reduced to a plain file name: no path, no control characters."""
    name = clean_text(name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")  # also bidi overrides
    name = re.sub(r'[<>:"|?*\x00]', "_", name).strip().strip(".").strip()
    if len(name) > 150:
        stem, dot, ext = name.rpartition(".")
        name = (stem[:140] + "." + ext[:9]) if dot and 0 < len(ext) <= 9 else name[:150]
    if not name:
        if content_type == "message/rfc822":
            extension = ".eml"
        else:
            extension = mimetypes.guess_extension(content_type) or ".bin"
        stem = "message" if content_type.startswith("message/") else \
            "image" if content_type.startswith("image/") else "attachment"
        name = stem + extension
    return name


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    for n in itertools.count(2):
        candidate = f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})"
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


class _TooComplex(Exception):
    pass


def _leaves(msg: Message) -> Iterator[tuple[Message, list[Message]]]:
    """Every part that is not a container, with its multipart ancestors; message/* parts are leaves."""
    stack: list[tuple[Message, list[Message]]] = [(msg, [])]
    count = 0
    while stack:
        part, ancestors = stack.pop()
        count += 1
        if count > MAX_ATTACHMENTS * 2 or len(ancestors) > MAX_DEPTH:
            raise _TooComplex()
        # get_payload() of a multipart hands back its list untouched; of a leaf it would decode
        if part.is_multipart() and _content_type(part).startswith("multipart/"):
            children = [p for p in part.get_payload() if isinstance(p, Message)]
            stack.extend((child, ancestors + [part]) for child in reversed(children))
        else:
            yield part, ancestors


def _mime_header(part: Message, name: str) -> Any:
    """``part.get(name)`` for a header in _STRUCTURAL, which are read several times per part.

    ``Message.get`` looks through every header each time; here the part's headers are
    looked through once, and the first of each name is kept (parsed messages are not
    changed afterwards).
    """
    found = part.__dict__.get("_cockpit_mime")
    if found is None:
        found = {}
        for key, value in part._headers:  # type: ignore[attr-defined]
            lowered = key.lower()
            if lowered in _STRUCTURAL and lowered not in found:
                found[lowered] = (key, value)
        part._cockpit_mime = found  # type: ignore[attr-defined]
    item = found.get(name)
    return None if item is None else part.policy.header_fetch_parse(*item)


def _content_type(part: Message) -> str:
    """``part.get_content_type()``, with the header read through _mime_header."""
    try:
        value = _mime_header(part, "content-type")
        if value is None:
            return part.get_default_type()
        ctype = str(value).partition(";")[0].strip().lower()
        return ctype if ctype.count("/") == 1 else "text/plain"  # RFC 2045 5.2, as the stdlib does
    except Exception:
        return "application/octet-stream"


def _params(part: Message, header: str) -> Any:
    """The parameters of a MIME header, as policy.default's header registry decoded them (RFC 2231 too)."""
    try:
        return getattr(_mime_header(part, header), "params", None) or {}
    except Exception:
        return {}


def _filename(part: Message) -> Optional[str]:
    name = _params(part, "content-disposition").get("filename") or _params(part, "content-type").get("name")
    return str(name) if name else None


def _disposition(part: Message) -> Optional[str]:
    try:
        value = getattr(_mime_header(part, "content-disposition"), "content_disposition", None)
        return str(value).lower() if value else None
    except Exception:
        return None


def _part_bytes(part: Message) -> bytes:
    """An attachment's content: the decoded payload, or the whole of an attached message."""
    if part.is_multipart():  # message/rfc822 and its kind hold parsed messages
        blobs = []
        for inner in part.get_payload():
            try:
                blobs.append(inner.as_bytes(policy=MAIL_POLICY))
            except Exception:
                try:
                    blobs.append(inner.as_bytes(policy=email_policy.compat32))
                except Exception:
                    blobs.append(str(inner).encode("utf-8", "surrogateescape"))
        return b"\r\n".join(blobs)
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    return _undecoded(part)


def _undecoded(part: Message) -> bytes:
    payload = part._payload  # the text as received: get_payload() would decode it with its charset
    if isinstance(payload, bytes):
        return payload
    return str(payload or "").encode("utf-8", "surrogateescape")


def _body(text: str, subtype: str) -> tuple[str, str]:
    if subtype == "html":
        try:
            return markdownify(text, heading_style="ATX", bullets="-").strip() + "\n", "md"
        except Exception:
            return text, "html"
    return text, "md" if looks_like_markdown(text) else "text"


# what the feedparser takes for the start of a header field (its headerRE, less "From " and
# continuation lines, and with a name of one character at least)
_FIELD_START = re.compile(r"[\041-\071\073-\176]+:")
# line ends of any kind, and what str.splitlines() would also break at
_LINE_BREAKS = b"\r\n\x0b\x0c\x1c\x1d\x1e"


def _header_fields(head: bytes) -> Optional[list[list[str]]]:
    """The fields of a header block that ends in CRLF, each as its lines (CRLF kept).

    The lines go to the fields as the stdlib's feedparser puts them, and the block is only
    taken when the feedparser would see nothing odd in it: None when a line ends in
    anything but CRLF, starts with "From ", is neither a field nor a continuation, or
    when the first line is a continuation.
    """
    crlf = head.count(b"\r\n")
    if len(head) - len(head.translate(None, _LINE_BREAKS)) != 2 * crlf:
        return None
    fields: list[list[str]] = []
    for line in head.decode("ascii", "surrogateescape").split("\r\n")[:-1]:
        if line[:1] in (" ", "\t"):
            if not fields:
                return None
            fields[-1].append(line + "\r\n")
        elif _FIELD_START.match(line):
            fields.append([line + "\r\n"])
        else:
            return None
    return fields


def read_headers(raw: bytes) -> Message:
    """``raw`` as ``BytesParser(policy=MAIL_POLICY).parsebytes(raw, headersonly=True)`` reads it.

    That parser walks every line of the message through a generator to find the end of
    the headers, then walks the body's lines only to join them again. When the text up
    to the first CRLF CRLF holds only well-formed fields, the message is built as the
    parser would build it: the policy's message class, each field through the policy's
    ``header_source_parse`` (values are parsed by the header registry when read), and
    the rest as the payload. A test checks that both agree on the hostile corpus. Any
    other message goes through the parser.
    """
    end = raw.find(b"\r\n\r\n")
    if end > 0:
        fields = _header_fields(raw[:end + 2])
        if fields is not None:
            msg = MAIL_POLICY.message_factory(policy=MAIL_POLICY)
            for lines in fields:
                msg.set_raw(*MAIL_POLICY.header_source_parse(lines))
            msg.set_payload(raw[end + 4:].decode("ascii", "surrogateescape"))
            return msg
    return BytesParser(policy=MAIL_POLICY).parsebytes(raw, headersonly=True)


def parse_mail(raw: bytes, envelope: Envelope, store: Store) -> EmailEvent:
    """The email event of ``raw``, its attachments written to ``store`` (blocks: call it in a thread)."""
    try:
        # the headers first: a single-part message is then parsed already, and only a
        # multipart or message/* one needs the parser to walk its body too
        msg = read_headers(raw)
        content_type = _content_type(msg)
        if content_type.startswith(("multipart/", "message/")):
            if isinstance(store, _NoWritesStore) and content_type != "multipart/alternative":
                # Other than text with its HTML, a multipart message most often carries
                # files: it is parsed once, in a thread, rather than up to its first file here.
                raise _WritesToDisk()
            msg = BytesParser(policy=MAIL_POLICY).parsebytes(raw)
        return _event(msg, raw, envelope, store)
    except (RecursionError, _TooComplex):
        log.info("a message from {sender} is too deeply nested or has too many parts to split; "
                 "kept whole as message.eml", sender=envelope.sender)
    except OSError:
        raise  # the store failed: 451, the sender tries again
    except Exception:
        # a message that trips the parser is still delivered, whole
        log.failure("a message from {sender} could not be taken apart; kept whole as message.eml",
                    sender=envelope.sender)
    return _whole_message_event(raw, envelope, store)


def _common_fields(msg: Optional[Message], raw: bytes, envelope: Envelope) -> dict[str, Any]:
    if msg is None:
        msg = BytesParser(policy=email_policy.compat32).parsebytes(raw, headersonly=True)
    headers: dict[str, list[str]] = {}
    for name, value in msg.raw_items():  # one pass: Message.get() walks every header each time
        headers.setdefault(name.lower(), []).append(str(value))
    return {
        "source": "smtp",
        "from": (_addresses(headers.get("from")) or [envelope.sender])[0],
        "to": _addresses(headers.get("to")) or list(envelope.recipients),
        "cc": _addresses(headers.get("cc")),
        "subject": _subject(msg, headers.get("subject")),
        "message_id": clean_text(headers.get("message-id", [""])[0]).strip()[:998],
    }


def _subject(msg: Message, values: Optional[list[str]]) -> str:
    if not values:
        return ""
    value = values[0]
    if "=?" not in value and value.isascii():
        # nothing to decode: unfolding is all the header registry would do, at a tenth of its cost
        return clean_text(" ".join(value.split()))[:998]
    return _header(msg, "subject")[:998]


@dataclass
class _Leaf:
    part: Message
    ancestors: list[Message]
    content_type: str
    disposition: Optional[str]
    filename: Optional[str]

    @classmethod
    def of(cls, part: Message, ancestors: list[Message]) -> "_Leaf":
        return cls(part, ancestors, _content_type(part), _disposition(part), _filename(part))

    def is_text(self, subtype: str) -> bool:
        return self.content_type == "text/" + subtype and self.disposition != "attachment" and not self.filename


def _event(msg: Message, raw: bytes, envelope: Envelope, store: Store) -> EmailEvent:
    fields = _common_fields(msg, raw, envelope)
    leaves = [_Leaf.of(part, ancestors) for part, ancestors in _leaves(msg)]
    body_leaf = next((leaf for leaf in leaves if leaf.is_text("plain")), None) \
        or next((leaf for leaf in leaves if leaf.is_text("html")), None)
    if body_leaf is None and not msg.is_multipart():
        whole = leaves[0]
        if whole.content_type.startswith(("text/", "multipart/")) and not whole.filename \
                and whole.disposition != "attachment":
            body_leaf = whole  # a single part of text/* other than plain, or a multipart that lost its parts
    # the other forms of the body (its multipart/alternative siblings) are no attachments
    alternatives: set[int] = set()
    for ancestor in reversed(body_leaf.ancestors if body_leaf else []):
        if _content_type(ancestor) == "multipart/alternative":
            alternatives = {id(leaf.part) for leaf in leaves if ancestor in leaf.ancestors}
            break
    body, bodytype = "", "text"
    if body_leaf is not None:
        subtype = body_leaf.content_type[5:] if body_leaf.content_type.startswith("text/") else "plain"
        body, bodytype = _body(decode_text(body_leaf.part), subtype)
    attachments: dict[str, str] = {}
    for leaf in leaves:
        if leaf is body_leaf or id(leaf.part) in alternatives:
            continue
        data = _part_bytes(leaf.part)
        if not data and not leaf.filename and leaf.content_type.startswith(("text/", "multipart/")):
            continue  # an empty text part carries nothing worth a file
        if len(attachments) >= MAX_ATTACHMENTS:
            raise _TooComplex()
        name = _unique(safe_filename(leaf.filename, leaf.content_type), set(attachments))
        stored = store.put_now(ATTACHMENTS_SPACE, data, name, leaf.content_type)
        attachments[name] = stored.url
    return EmailEvent.model_validate({**fields, "body": body, "bodytype": bodytype,
                                      "attachments": attachments})


def _whole_message_event(raw: bytes, envelope: Envelope, store: Store) -> EmailEvent:
    """A message whose structure cannot be taken apart: the whole of it becomes one attachment."""
    try:
        fields = _common_fields(None, raw, envelope)
    except Exception:
        fields = {"source": "smtp", "from": envelope.sender, "to": list(envelope.recipients)}
    stored = store.put_now(ATTACHMENTS_SPACE, raw, "message.eml", "message/rfc822")
    return EmailEvent.model_validate({**fields, "body": "", "bodytype": "text",
                                      "attachments": {"message.eml": stored.url}})


def _unstuffed(chunks: list[bytes]) -> bytes:
    raw = b"".join(chunks)
    if raw.startswith(b".."):
        raw = raw[1:]
    return raw.replace(b"\r\n..", b"\r\n.") if b"\r\n.." in raw else raw


def parse_job(items: list[tuple[list[bytes], Envelope]], store: Store) -> list[Union[EmailEvent, Failure]]:
    """One thread hop for several messages: each gets its event or the failure that stopped it."""
    results: list[Union[EmailEvent, Failure]] = []
    for chunks, envelope in items:
        try:
            results.append(parse_mail(_unstuffed(chunks), envelope, store))
        except Exception:
            results.append(Failure())
    return results


class _WritesToDisk(OSError):
    """Parsing reached an attachment, which must be written to disk: not on the reactor thread."""


class _NoWritesStore:
    """Stands in for the store while a small message is parsed on the reactor thread."""

    def put_now(self, *args: Any, **kwargs: Any) -> Any:
        raise _WritesToDisk()


_NO_WRITES = _NoWritesStore()


# ---------------------------------------------------------------------------------------------
# Receiving: SMTP dialogue -> parse in a thread -> publish -> reply.
# ---------------------------------------------------------------------------------------------

class MailIngest:
    """Turns received messages into published events; answers each with an SMTP reply.

    A message of at most ``inline_bytes`` with no attachment is parsed at once; others are
    parsed in the reactor's thread pool, at most ``jobs`` batches at a time: the GIL
    lets one thread parse at once, and a second covers a batch that waits on the disk.
    Messages that complete while the jobs run wait and go together in the next batch,
    so one thread hop and one Redis transaction serve many messages under load.
    """

    def __init__(self, bus: Bus, store: Store, reactor: Any, jobs: int = 2,
                 batch_bytes: int = 4 << 20, batch_count: int = 128, inline_bytes: int = 32 << 10):
        self.inline_bytes = inline_bytes
        self.bus = bus
        self.store = store
        self.reactor = reactor
        self.jobs = jobs
        self.batch_bytes = batch_bytes
        self.batch_count = batch_count
        self._batch: list[tuple[list[bytes], Envelope, Deferred]] = []
        self._batch_size = 0
        self._flush_call: Any = None
        self._running = 0
        self.received = 0

    def deliver(self, chunks: list[bytes], size: int, envelope: Envelope) -> Deferred:
        """Fires with ``(code, text)``: 250 once the event is on the bus, 451 or 5xx otherwise."""
        d: Deferred = Deferred()
        if size <= self.inline_bytes:
            # A small message with nothing to store parses in less time than a thread hop
            # costs, so it is parsed here; one that has attachments goes to the thread pool.
            try:
                event = parse_mail(_unstuffed(chunks), envelope, _NO_WRITES)  # type: ignore[arg-type]
            except _WritesToDisk:
                pass
            except Exception:
                d.callback(self._refusal(Failure(), envelope))
                return d
            else:
                self._parsed([event], [(chunks, envelope, d)])
                return d
        self._batch.append((chunks, envelope, d))
        self._batch_size += size
        if self._flush_call is None and self._running < self.jobs:
            # messages that end in the same reactor turn share one thread hop
            self._flush_call = self.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flush_call = None
        while self._batch and self._running < self.jobs:
            take, size = 0, 0
            while take < len(self._batch) and take < self.batch_count and (take == 0 or size < self.batch_bytes):
                size += sum(len(c) for c in self._batch[take][0])
                take += 1
            batch, self._batch = self._batch[:take], self._batch[take:]
            self._batch_size -= size
            self._running += 1
            job = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), parse_job,
                                            [(chunks, envelope) for chunks, envelope, _ in batch], self.store)
            job.addCallbacks(self._parsed, self._job_failed, callbackArgs=(batch,), errbackArgs=(batch,))
            job.addBoth(self._job_done)

    def _job_done(self, _: Any) -> None:
        self._running -= 1
        if self._batch and self._flush_call is None:
            self._flush()

    def _job_failed(self, failure: Failure, batch: list) -> None:
        self._parsed([failure] * len(batch), batch)

    def _parsed(self, results: list, batch: list) -> None:
        for result, (_, envelope, d) in zip(results, batch):
            if isinstance(result, Failure):
                d.callback(self._refusal(result, envelope))
                continue
            published = self.bus.publish(result)
            published.addCallbacks(self._published, self._not_published,
                                   callbackArgs=(result, envelope), errbackArgs=(envelope,))
            published.chainDeferred(d)

    def _published(self, entry_id: Any, event: EmailEvent, envelope: Envelope) -> tuple[int, bytes]:
        self.received += 1
        log.info("mail from {sender} to {recipients} published as {guid} with {count} attachments",
                 sender=envelope.sender, recipients=envelope.recipients, guid=event.guid,
                 count=len(event.attachments))
        return 250, f"2.0.0 Accepted as {event.guid}".encode()

    def _not_published(self, failure: Failure, envelope: Envelope) -> tuple[int, bytes]:
        if failure.check(BusUnavailable):
            log.warn("mail from {sender} refused for now, the bus is unavailable: {error}",
                     sender=envelope.sender, error=failure.getErrorMessage())
            return 451, b"4.3.0 The event bus is unavailable; please try again later"
        log.failure("mail from {sender} could not be published", failure, sender=envelope.sender)
        return 451, b"4.3.0 Local error while publishing; please try again later"

    def _refusal(self, failure: Failure, envelope: Envelope) -> tuple[int, bytes]:
        if failure.check(MessageRefused):
            return failure.value.code, failure.value.text.encode()
        if failure.check(OSError):
            log.failure("mail from {sender}: the store could not write an attachment", failure,
                        sender=envelope.sender)
            return 451, b"4.3.0 Attachments cannot be stored right now; please try again later"
        log.failure("mail from {sender} could not be parsed", failure, sender=envelope.sender)
        return 554, b"5.6.0 The message could not be parsed"


@implementer(smtp.IMessageDelivery)
class _Submitter:
    """The avatar of an authenticated client; delivery itself is the protocol's business."""

    def __init__(self, username: str):
        self.username = username

    def receivedHeader(self, helo, origin, recipients):  # pragma: no cover - not used by our DATA
        return None

    def validateFrom(self, helo, origin):  # pragma: no cover - the protocol validates
        return origin

    def validateTo(self, user):  # pragma: no cover - the protocol validates
        return lambda: None


@implementer(IRealm)
class _SubmitterRealm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any):
        name = avatar_id.decode("utf-8", "replace") if isinstance(avatar_id, bytes) else str(avatar_id)
        return smtp.IMessageDelivery, _Submitter(name), lambda: None


@implementer(ICredentialsChecker)
class _UserChecker:
    """``[mail] users`` (name -> password), compared in constant time."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[str, str]):
        self.users = {name.encode(): password.encode() for name, password in users.items()}

    def requestAvatarId(self, credentials: Any) -> Deferred:
        username = credentials.username or b""
        password = credentials.password or b""
        expected = self.users.get(username)
        if expected is not None and hmac.compare_digest(expected, password):
            return defer.succeed(username)
        return defer.fail(cred_error.UnauthorizedLogin())


class IncomingSMTP(smtp.ESMTP):
    """Twisted's ESMTP with SIZE, 8BITMIME, AUTH only under TLS, domain checks and streamed DATA."""

    timeout = 300

    def __init__(self, factory: "IncomingMailFactory"):
        challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials} if factory.portal else {}
        super().__init__(challengers, factory.tls)
        self.mail_factory = factory
        self.portal = factory.portal
        self.host = factory.mail.hostname.encode("idna") if factory.mail.hostname.isascii() \
            else factory.mail.hostname.encode("utf-8")
        self.user: Optional[str] = None
        self._pending = b""  # received bytes not yet handled (commands, or data before 354 was sent)
        self._busy = False  # a message is being parsed and published: later input waits
        self._paused = False  # reading stopped: too much input waits behind a busy message
        self._tls_just_started = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._tail = b""
        self._too_big = False
        self._envelope: Optional[Envelope] = None
        self.closed: list[Deferred] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        if ISSLTransport.providedBy(self.transport):
            self.startedTLS = True  # a listener on ssl:465 is encrypted from the start

    # -- the advertised extensions ------------------------------------------------
    def greeting(self) -> bytes:
        return self.host + b" ESMTP cockpit"

    def extensions(self) -> dict[bytes, Optional[list[bytes]]]:
        ext: dict[bytes, Optional[list[bytes]]] = {
            b"SIZE": [str(self.mail_factory.mail.max_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self.startedTLS and self.challengers and not self.authenticated:
            ext[b"AUTH"] = list(self.challengers)  # never over plain text
        return ext

    def ext_STARTTLS(self, rest: bytes) -> None:
        super().ext_STARTTLS(rest)
        if self.startedTLS:
            # RFC 3207: forget the plain-text dialogue, and any plain text pipelined behind STARTTLS
            self._tls_just_started = True
            self._helo = (None, self._helo[1] if self._helo else b"")
            self._from = None
            self._to = []

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.challengers:
            self.sendCode(502, b"5.5.1 AUTH is not enabled on this server")
        elif not self.startedTLS:
            self.sendCode(538, b"5.7.11 Encryption required: issue STARTTLS first")
        else:
            super().ext_AUTH(rest)

    def state_AUTH(self, response: Optional[bytes]) -> None:
        try:
            super().state_AUTH(response)
        except Exception:  # a malformed PLAIN response raises from deep inside cred
            self.challenger = None
            self.mode = smtp.COMMAND
            self.sendCode(501, b"5.5.2 Malformed authentication response")

    def _cbAuthenticated(self, loginInfo: Any) -> Any:
        result = super()._cbAuthenticated(loginInfo)
        self.user = loginInfo[1].username
        log.info("SMTP client {peer} authenticated as {user}", peer=self._peer(), user=self.user)
        return result

    def _peer(self) -> str:
        try:
            return str(self.transport.getPeer().host)
        except Exception:
            return "?"

    # -- envelope ---------------------------------------------------------------
    # MAIL and RCPT as Twisted's SMTP answers them, with the same replies, but checked at
    # once: our checks never wait, so they need no Deferred per command.
    def do_MAIL(self, rest: bytes) -> None:
        if self._from:
            self.sendCode(503, b"Only one sender per message, please")
            return
        self._to = []
        match = self.mail_re.match(rest)
        if not match:
            self.sendCode(501, b"Syntax error")
            return
        for option in (match.group("opts") or b"").split():
            key, _, value = option.partition(b"=")
            if key.upper() == b"SIZE" and value.isdigit() and int(value) > self.mail_factory.mail.max_size:
                self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size (%d bytes)"
                              % self.mail_factory.mail.max_size)
                return
        try:
            self._from = smtp.Address(match.group("path"), self.host)
        except smtp.AddressError as exc:
            self.sendCode(553, str(exc).encode("utf-8", "replace"))
            return
        self.sendCode(250, b"Sender address accepted")  # any sender: the recipients decide

    def do_RCPT(self, rest: bytes) -> None:
        if not self._from:
            self.sendCode(503, b"Must have sender before recipient")
            return
        match = self.rcpt_re.match(rest)
        if not match:
            self.sendCode(501, b"Syntax error")
            return
        try:
            user = smtp.User(match.group("path"), self._helo, self, self._from)
        except smtp.AddressError as exc:
            self.sendCode(553, str(exc).encode("utf-8", "replace"))
            return
        try:
            accepted = self.validateTo(user)
        except smtp.SMTPServerError as exc:  # SMTPBadRcpt too
            self.sendCode(exc.code, str(exc.resp).encode("utf-8", "replace"))
            return
        self._to.append((user, accepted))
        self.sendCode(250, b"Recipient address accepted")

    def validateTo(self, user: smtp.User) -> Any:
        if len(self._to) >= MAX_RECIPIENTS:
            raise smtp.SMTPServerError(452, "4.5.3 Too many recipients")
        domains = self.mail_factory.domains
        domain = user.dest.domain.decode("utf-8", "replace").lower().rstrip(".")
        if domains and domain not in domains:
            raise smtp.SMTPBadRcpt(str(user.dest), 550,
                                   f"5.1.1 <{user.dest}>: recipient not accepted here, "
                                   f"this server takes mail for {', '.join(sorted(domains))}")
        return lambda: None

    # -- input ------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self.mode == RAWDATA:
            self._data_received(data)
            return
        self._pending += data
        if self._busy:
            if len(self._pending) > MAX_WAITING and not self._paused:
                # Reading stops only when this much waits: stopping and restarting it for
                # every message would cost two epoll calls per mail.
                self._paused = True
                self.transport.pauseProducing()
            return
        self._handle_pending()

    def _handle_pending(self) -> None:
        while not self._busy and not self.transport.disconnecting:
            if self.mode == RAWDATA:
                data, self._pending = self._pending, b""
                if data:
                    self._data_received(data)
                return
            end = self._pending.find(b"\r\n")
            if end < 0:
                break
            line, self._pending = self._pending[:end], self._pending[end + 2:]
            if len(line) > MAX_COMMAND_LINE:
                self.lineLengthExceeded(line)
                return
            self.lineReceived(line)
            if self._tls_just_started:
                self._tls_just_started = False
                self._pending = b""
                return
        if len(self._pending) > MAX_COMMAND_LINE and self.mode != RAWDATA:
            self.lineLengthExceeded(self._pending)

    def lineLengthExceeded(self, line: bytes) -> None:
        # without a line end there is no knowing where the next command starts
        self._pending = b""
        self.sendCode(500, b"5.5.2 Line too long")
        self.transport.loseConnection()

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 Must have valid receiver and originator")
            return
        self._envelope = Envelope(
            sender=str(self._from), recipients=[str(user.dest) for user, _ in self._to],
            helo=(self._helo[0] or b"").decode("utf-8", "replace") if self._helo else "",
            peer=self._peer(), tls=self.startedTLS, user=self.user)
        self._from = None
        self._to = []
        self.mode = RAWDATA
        self._chunks = []
        self._size = 0
        self._tail = b"\r\n"  # the CRLF that ended DATA: a first line of "." ends an empty message
        self._too_big = False
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _data_received(self, data: bytes) -> None:
        """Collect the message as chunks; past max_size, only look for its end."""
        window = self._tail + data
        end = window.find(b"\r\n.\r\n")
        if end < 0:
            self._keep(data)
            self._tail = window[-4:]
            return
        cut = end + 2 - len(self._tail)  # where the message ends within ``data`` (CRLF included)
        if cut >= 0:
            self._keep(data[:cut])
        elif not self._too_big:
            # the end marker began in the previous chunk: take back what was kept of it
            drop = -cut
            while drop and self._chunks:
                last = self._chunks.pop()
                if len(last) > drop:
                    self._chunks.append(last[:-drop])
                    drop = 0
                else:
                    drop -= len(last)
        rest = window[end + 5:]
        self.mode = smtp.COMMAND
        self._pending = rest + self._pending
        self._message_complete()

    def _keep(self, data: bytes) -> None:
        self._size += len(data)
        if self._too_big:
            return
        if self._size > self.mail_factory.mail.max_size:
            self._too_big = True
            self._chunks = []  # memory stays bounded: nothing more is kept of this message
            return
        if data:
            self._chunks.append(data)

    def _message_complete(self) -> None:
        envelope, self._envelope = self._envelope, None
        chunks, self._chunks = self._chunks, []
        if self._too_big or envelope is None:
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size (%d bytes)"
                          % self.mail_factory.mail.max_size)
            self._handle_pending()
            return
        self._busy = True
        d = self.mail_factory.ingest.deliver(chunks, self._size, envelope)
        d.addErrback(self._delivery_crashed)
        d.addCallback(self._answer)

    def _delivery_crashed(self, failure: Failure) -> tuple[int, bytes]:
        log.failure("mail delivery failed unexpectedly", failure)
        return 451, b"4.3.0 Local error in processing; please try again later"

    def _answer(self, reply: tuple[int, bytes]) -> None:
        self._busy = False
        if self.transport is None or self.transport.disconnected:
            return
        self.sendCode(*reply)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._handle_pending()

    def connectionLost(self, reason: Any) -> None:
        self.mode = smtp.COMMAND  # nothing of a half-received message is kept
        self._chunks = []
        super().connectionLost(reason)
        self.mail_factory.connections.discard(self)
        closed, self.closed = self.closed, []
        for d in closed:
            d.callback(None)

    def when_closed(self) -> Deferred:
        """Fires once this connection is gone."""
        if self.transport is None or getattr(self.transport, "disconnected", False):
            return defer.succeed(None)
        d: Deferred = Deferred()
        self.closed.append(d)
        return d


class IncomingMailFactory(protocol.ServerFactory):
    """The SMTP listener's factory, built from ``[mail]``, the bus and the store."""

    protocol = IncomingSMTP  # type: ignore[assignment]
    noisy = False

    def __init__(self, mail: MailSection, bus: Bus, store: Store, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.mail = mail
        self.domains = frozenset(d.lower().rstrip(".") for d in mail.domains)
        self.ingest = MailIngest(bus, store, reactor)
        self.tls = server_tls(mail) if mail.tls_cert else None
        self.connections: set[IncomingSMTP] = set()
        self.portal = Portal(_SubmitterRealm(), [_UserChecker(mail.users)]) if mail.users and self.tls else None

    def buildProtocol(self, addr: Any) -> IncomingSMTP:
        p = IncomingSMTP(self)
        p.factory = self
        self.connections.add(p)
        return p

    def when_idle(self) -> Deferred:
        """Fires once every open connection has closed (for an orderly stop)."""
        return defer.gatherResults([p.when_closed() for p in list(self.connections)])


def server_tls(mail: MailSection) -> Any:
    """The STARTTLS context of ``[mail] tls_cert`` (and ``tls_key``); exits with one line if unusable."""
    from twisted.internet import ssl

    try:
        pem = Path(mail.tls_cert).read_bytes()  # type: ignore[arg-type]
        if mail.tls_key:
            pem += b"\n" + Path(mail.tls_key).read_bytes()
        return ssl.PrivateCertificate.loadPEM(pem).options()
    except Exception as exc:  # OSError, or OpenSSL's opinion of the PEM
        raise SystemExit(f"cockpit: [mail] tls_cert: cannot use {mail.tls_cert} "
                         f"(with tls_key {mail.tls_key}) for STARTTLS: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Sending.
# ---------------------------------------------------------------------------------------------

_ADDRESS_RE = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@[^\s@<>()\[\],;:\"\\]+$")


def _check_address(value: str) -> str:
    value = value.strip()
    if not _ADDRESS_RE.match(value) or len(value) > 320:
        raise ValueError(f"expected a plain address such as ops@example.com, got {value!r}")
    return value


class OutgoingMail(BaseModel):
    """A mail for the relay: the body of ``POST /api/mail`` and of ``service.send_mail``."""

    model_config = ConfigDict(extra="forbid")

    to: list[str] = Field(min_length=1, max_length=MAX_RECIPIENTS, description="recipient addresses")
    cc: list[str] = Field(default=[], max_length=MAX_RECIPIENTS)
    subject: str = Field(max_length=998)
    body: str = Field(max_length=10 * 1024 * 1024)
    bodytype: Literal["text", "md", "html"] = "text"

    @field_validator("to", "cc")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_check_address(address) for address in value]

    @field_validator("subject")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # a subject is one header line: folding it is the library's job, not the caller's
        return " ".join(value.split())


def build_message(mail: OutgoingMail, sender: str, message_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(mail.to)
    if mail.cc:
        msg["Cc"] = ", ".join(mail.cc)
    msg["Subject"] = mail.subject
    msg["Date"] = format_datetime(_utcnow())
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"
    if mail.bodytype == "html":
        msg.set_content(markdownify(mail.body, heading_style="ATX"))
        msg.add_alternative(mail.body, subtype="html")
    else:
        msg.set_content(mail.body)
    return msg


def _utcnow() -> Any:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc)


@dataclass
class _Delivering:
    """A mail this process is delivering: its next attempt's timer, or the attempt under way."""

    mail: QueuedMail
    done: Deferred  # fires once the outbox has booked the mail finished or suspended
    timer: Any = None
    attempt: Optional[Deferred] = None
    stopping: bool = False


class MailSender(Service):
    """Delivers :class:`OutgoingMail` through ``[mail.relay]``, retrying with backoff.

    A mail is stored in the :class:`~cockpit.outbox.Outbox` before :meth:`send` fires, and
    stays there until it is sent or has failed: a stop or a crash does not lose it.
    """

    def __init__(self, relay: RelaySection, reactor: Any = None, hostname: Optional[str] = None,
                 first_delay: float = 5.0, max_delay: float = 600.0, history: int = 500,
                 max_queued: int = 10000, concurrency: int = 4, outbox: Optional[Outbox] = None):
        if reactor is None:
            from twisted.internet import reactor
        self.relay = relay
        self.reactor = reactor
        self.hostname = hostname or "localhost"
        self.first_delay = first_delay
        self.max_delay = max_delay
        # without an outbox of its own, mail waits in memory only (a sender under test)
        self.outbox = outbox if outbox is not None else SpoolOutbox(None, reactor, history, max_queued)
        self._slots = defer.DeferredSemaphore(concurrency)  # attempts under way at once
        self._delivering: dict[str, _Delivering] = {}
        self._watchers: dict[str, list[Deferred]] = {}
        self._schedule_watchers: dict[str, list[Deferred]] = {}
        self._tls = self._client_tls() if (relay.starttls or relay.tls) else None

    def _client_tls(self) -> Any:
        from twisted.internet import ssl

        trust = None
        if self.relay.ca_cert:
            try:
                trust = ssl.Certificate.loadPEM(Path(self.relay.ca_cert).read_bytes())
            except Exception as exc:
                raise SystemExit(f"cockpit: [mail.relay] ca_cert: cannot use {self.relay.ca_cert}: {exc}") from None
        return ssl.optionsForClientTLS(self.relay.host, trustRoot=trust)

    # -- API ---------------------------------------------------------------------
    def send(self, mail: OutgoingMail) -> Deferred:
        """Store ``mail`` for the relay; fires with its delivery record once it is stored (not once delivered).

        Fails with MailQueueFull when too many mails wait, with BusUnavailable when it cannot be stored.
        """
        mail_id = uuid.uuid4().hex
        domain = self.relay.sender.rpartition("@")[2] or self.hostname
        message = build_message(mail, self.relay.sender, make_msgid(mail_id[:16], domain=domain))
        raw = message.as_bytes(policy=email_policy.default)  # sendmail turns \n into CRLF itself
        record = {"id": mail_id, "to": list(mail.to), "cc": list(mail.cc), "subject": mail.subject,
                  "state": "queued", "attempts": 0, "error": None, "queued": time.time(), "sent": None,
                  "retry_at": None}
        accepted = dict(record)  # the delivery may begin before the caller hears of it

        def stored(_: Any) -> dict[str, Any]:
            log.info("mail {id} to {to} queued for {relay}", id=mail_id, to=record["to"], relay=self.relay.host)
            return accepted

        return self.outbox.add(QueuedMail(record, list(mail.to) + list(mail.cc), raw)).addCallback(stored)

    def deliveries(self, limit: int = 50) -> Deferred:
        """Fires with the delivery records, newest first."""
        return self.outbox.records(limit)

    def get(self, mail_id: str) -> Deferred:
        """Fires with the delivery record of ``mail_id``, or None."""
        return self.outbox.record(mail_id)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "relay": f"{self.relay.host}:{self.relay.port}", "queued": len(self._delivering)}

    # -- lifetime ----------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self.outbox.start(self._take)

    def stopService(self) -> Any:
        super().stopService()
        stopped = self.outbox.stop()  # first: no more mail is handed out
        left = list(self._delivering.values())
        if left:
            log.info("stopping with {count} mails not yet delivered; they stay queued", count=len(left))
        for delivering in left:
            delivering.stopping = True
            if delivering.timer is not None and delivering.timer.active():
                delivering.timer.cancel()
            if delivering.attempt is not None:
                delivering.attempt.cancel()
            self._suspend(delivering)
        return defer.DeferredList([stopped, *(d.done for d in left)], consumeErrors=True)

    # -- delivery ----------------------------------------------------------------
    def _take(self, mail: QueuedMail) -> Deferred:
        """Deliver ``mail`` until it is sent, has failed, or this sender stops."""
        if not self.running:
            return defer.fail(RuntimeError("the mail sender is stopped"))
        if mail.id in self._delivering:  # handed out twice (a reclaim that raced its own heartbeat)
            return self._delivering[mail.id].done
        delivering = _Delivering(mail, Deferred())
        self._delivering[mail.id] = delivering
        retry_at = mail.record.get("retry_at")
        delay = min(max(retry_at - time.time(), 0.0), self.max_delay) if retry_at else 0.0
        self._schedule(delivering, delay)
        return delivering.done

    def _schedule(self, delivering: _Delivering, delay: float) -> None:
        if delay > 0:
            delivering.timer = self.reactor.callLater(delay, self._attempt, delivering)
        for d in self._schedule_watchers.pop(delivering.mail.id, []):
            d.callback(delay)
        if delay <= 0:
            self._attempt(delivering)

    def _attempt(self, delivering: _Delivering) -> None:
        delivering.timer = None
        if delivering.stopping:
            return
        d = delivering.attempt = self._slots.run(self._send_once, delivering)
        d.addCallbacks(self._sent, self._failed, callbackArgs=(delivering,), errbackArgs=(delivering,))

    def _send_once(self, delivering: _Delivering) -> Deferred:
        record = delivering.mail.record
        record["attempts"] += 1
        assert delivering.mail.raw is not None
        return self._deliver(delivering.mail.recipients, delivering.mail.raw)

    def _deliver(self, recipients: list[str], raw: bytes) -> Deferred:
        relay = self.relay
        result: Deferred = Deferred(lambda _: factory.currentProtocol.transport.abortConnection()
                                    if factory.currentProtocol else connector.disconnect())
        factory = smtp.ESMTPSenderFactory(
            relay.username.encode() if relay.username else None,
            relay.password.encode() if relay.password else None,
            relay.sender, [r.encode() for r in recipients], BytesIO(raw), result,
            retries=0, timeout=relay.timeout, contextFactory=self._tls,
            heloFallback=not (relay.starttls or relay.username),
            requireAuthentication=bool(relay.username),
            requireTransportSecurity=relay.starttls or relay.tls,
            hostname=relay.host)
        factory.domain = self.hostname.encode("idna")
        factory.noisy = False
        if relay.tls:
            connector = self.reactor.connectSSL(relay.host, relay.port, factory, self._tls,
                                                timeout=relay.timeout)
        else:
            connector = self.reactor.connectTCP(relay.host, relay.port, factory, timeout=relay.timeout)
        return result

    def _sent(self, result: Any, delivering: _Delivering) -> None:
        delivering.attempt = None
        if delivering.stopping:
            return  # sent after all, but already suspended: it goes out again (at least once)
        record = delivering.mail.record
        record.update(state="sent", sent=time.time(), error=None, retry_at=None)
        log.info("mail {id} to {to} delivered to {relay} after {attempts} attempts",
                 id=record["id"], to=record["to"], relay=self.relay.host, attempts=record["attempts"])
        self._finish(delivering, None)

    def _failed(self, failure: Failure, delivering: _Delivering) -> None:
        delivering.attempt = None
        if delivering.stopping:
            return
        record = delivering.mail.record
        error = failure.getErrorMessage()
        code = getattr(failure.value, "code", None)
        if isinstance(error, bytes):
            error = error.decode("utf-8", "replace")
        record["error"] = str(error)[:1000]
        permanent = isinstance(code, int) and 500 <= code < 600
        if permanent or record["attempts"] > self.relay.retries:
            record.update(state="failed", retry_at=None)
            log.error("mail {id} to {to} failed after {attempts} attempts: {error}",
                      id=record["id"], to=record["to"], attempts=record["attempts"], error=record["error"])
            self._finish(delivering, record["error"])
            return
        delay = min(self.first_delay * 2 ** (record["attempts"] - 1), self.max_delay)
        record["retry_at"] = time.time() + delay
        log.warn("mail {id}: relay {relay} failed ({error}); attempt {next} in {delay:.0f}s",
                 id=record["id"], relay=self.relay.host, error=record["error"], next=record["attempts"] + 1,
                 delay=delay)
        stored = self.outbox.update(dict(record))
        self._schedule(delivering, delay)
        # kept in memory meanwhile; it is stored again at the next outcome
        stored.addErrback(lambda f: log.warn("mail {id}: cannot store its record: {error}",
                                             id=record["id"], error=f.getErrorMessage()))
        stored.addBoth(lambda _: self._outcome(delivering))

    def _finish(self, delivering: _Delivering, dead_error: Optional[str]) -> None:
        self._delivering.pop(delivering.mail.id, None)
        booked = self.outbox.finish(delivering.mail, dead_error)

        def not_booked(failure: Failure) -> Failure:
            log.warn("mail {id}: cannot store that it is {state}: {error}; it may be sent again",
                     id=delivering.mail.id, state=delivering.mail.record["state"], error=failure.getErrorMessage())
            return failure

        booked.addErrback(not_booked)
        booked.addBoth(self._outcome_then, delivering)
        booked.chainDeferred(delivering.done)

    def _suspend(self, delivering: _Delivering) -> None:
        self._delivering.pop(delivering.mail.id, None)
        delivering.mail.record["state"] = "queued"
        self.outbox.suspend(delivering.mail).addErrback(
            self._not_suspended, delivering).chainDeferred(delivering.done)

    @staticmethod
    def _not_suspended(failure: Failure, delivering: _Delivering) -> Failure:
        if failure.check(Suspended):
            return failure  # tells the bus consumer to leave the entry pending; nothing went wrong
        log.warn("mail {id}: cannot store it for the next start: {error}; it stays pending",
                 id=delivering.mail.id, error=failure.getErrorMessage())
        return failure

    def _outcome_then(self, result: Any, delivering: _Delivering) -> Any:
        self._outcome(delivering)
        return result

    def _outcome(self, delivering: _Delivering) -> None:
        record = dict(delivering.mail.record)
        for d in self._watchers.pop(record["id"], []):
            d.callback(record)

    def next_outcome(self, mail_id: str) -> Deferred:
        """Fires with the record once the next delivery attempt of ``mail_id`` here has ended and is stored."""
        d: Deferred = Deferred()
        self._watchers.setdefault(mail_id, []).append(d)
        return d

    def next_schedule(self, mail_id: str) -> Deferred:
        """Fires with the delay in seconds once the next attempt of ``mail_id`` is scheduled here."""
        d: Deferred = Deferred()
        self._schedule_watchers.setdefault(mail_id, []).append(d)
        return d
