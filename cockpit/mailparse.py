"""Reading received mail: bytes -> :class:`EmailEvent`, attachments into the store.

Blocking, and pure apart from the store writes: the SMTP server runs it on the reactor
thread only for a small message with no file to store and no HTML to convert, and
otherwise in a mail parser process (:mod:`cockpit.parse_worker`) or a thread. A message
is read with the stdlib ``email`` package and ``policy.default`` (docs/design.md §3 email):
``text/plain`` is preferred for the body, HTML alone becomes Markdown that links only to
http, https and mailto (:mod:`cockpit.mailhtml`), plain text with any other link is no
Markdown, and every other part, inline images and attached messages included, goes to
the store space ``attachments``. A message nested too deeply, with too many parts, or
that trips the parser is kept whole as ``message.eml``.
"""
from __future__ import annotations

import codecs
import functools
import itertools
import mimetypes
import re
import unicodedata
from dataclasses import dataclass
from email import policy as email_policy
from email.message import Message
from email.parser import BytesParser
from email.policy import EmailPolicy
from email.utils import getaddresses
from typing import Any, Iterator, Optional, cast

from twisted.logger import Logger

from cockpit.events import EmailEvent
from cockpit.store import Store

log = Logger()

ATTACHMENTS_SPACE = "attachments"
MAX_DEPTH = 32  # deeper MIME nesting is kept whole as message.eml
MAX_ATTACHMENTS = 500  # more parts than this are kept whole as message.eml
MD_SCAN = 100_000  # characters of a plain body examined for Markdown

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
    """What the SMTP dialogue said about a message, as opposed to its headers: the event's
    fallback sender and recipients when the headers have none."""

    sender: str
    recipients: list[str]


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
    ("](", re.compile(r"\[[^\]\n]+\]\((?:https?://|mailto:)[^)\s]*\)", re.I)),  # inline link
    ("**", re.compile(r"(?<![\w*])\*\*(?=\S)[^\n*]+(?<=\S)\*\*(?![\w*])")),  # **strong**
    ("*", re.compile(r"(?<![\w*])\*(?=[^\s*])[^\n*]+(?<=[^\s*])\*(?![\w*])")),  # *emphasis*
]
_MD_MARK_BYTES = b"#`~]*"  # every strong mark needs one of these
# a list item at the start of a line; searched in "\n" + text, since a pattern that starts with
# a literal is scanned for in C, where "^" with re.M is tried at every position
_MD_LIST_ITEM = re.compile(r"\n {0,3}(?:[-*+]|\d{1,3}[.)])[ \t]+\S")


LINK_SCHEMES = frozenset({"http", "https", "mailto"})  # what a link in an event's Markdown body may point to
# Where Markdown takes a link target: after "](" (an inline link or image) and after "]:" at the
# start of a line (a link reference definition); the target must start with a scheme of
# LINK_SCHEMES, spelled out. "<" opens an autolink or raw HTML, and may open only an autolink
# to such a URL or to a mail address. Anything else may be a link elsewhere, or HTML.
_UNSAFE_MARKDOWN = re.compile(
    r"\][ \t]*+\(\s*+<?+(?!https?://|mailto:)"
    r"|(?:^|\n) {0,3}\[(?:[^\[\]\\]|\\.){0,999}\]:\s*+<?+(?!https?://|mailto:)"
    r"|<(?=[a-z/!?])(?!(?:https?://|mailto:)[^\s<>]*>|[\w.!#$%&'*+/=?^`{|}~-]+@[\w.-]+>)",
    re.I | re.A)


def has_unsafe_links(text: str) -> bool:
    """Whether ``text``, read as Markdown, may hold a link not to http, https or mailto, or raw HTML.

    Errs on the side of yes: such a text is then shown as plain text, where nothing is a link.
    """
    if "]" not in text and "<" not in text:
        return False
    return _UNSAFE_MARKDOWN.search(text) is not None


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
        # the payload of a multipart is its list of messages; the stubs cannot tell it from a leaf's
        for inner in cast(list[Message], part.get_payload()):
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
    # the text as received (get_payload() would decode it with its charset); private, so not in the stubs
    payload = part._payload  # type: ignore[attr-defined]
    if isinstance(payload, bytes):
        return payload
    return str(payload or "").encode("utf-8", "surrogateescape")


def _body(text: str, subtype: str) -> tuple[str, str]:
    """The event's body and bodytype: HTML becomes Markdown that links only to LINK_SCHEMES;
    plain text is Markdown when it looks like it and holds no other link (else it is text)."""
    if subtype == "html":
        from cockpit.mailhtml import html_to_markdown  # here: most mail has a plain-text body

        try:
            return html_to_markdown(text), "md"
        except RecursionError:
            log.info("an HTML body is nested too deeply to convert; kept as text")
        except Exception:
            log.failure("an HTML body could not be converted; kept as text")
        return text, "text"  # its source, where no link is a link
    return text, "md" if looks_like_markdown(text) and not has_unsafe_links(text) else "text"


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
            factory = MAIL_POLICY.message_factory
            assert factory is not None  # policy.default's, EmailMessage
            msg = factory(policy=MAIL_POLICY)
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
            if isinstance(store, NoWritesStore) and content_type != "multipart/alternative":
                # Other than text with its HTML, a multipart message most often carries
                # files: it is parsed once, in a thread, rather than up to its first file here.
                raise NotOnReactor()
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
        if subtype == "html" and isinstance(store, NoWritesStore):
            raise NotOnReactor()  # converting HTML takes milliseconds per kilobyte
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


def unstuff(chunks: list[bytes]) -> bytes:
    raw = b"".join(chunks)
    if raw.startswith(b".."):
        raw = raw[1:]
    return raw.replace(b"\r\n..", b"\r\n.") if b"\r\n.." in raw else raw


class NotOnReactor(OSError):
    """Parsing reached work that must not run on the reactor thread: an attachment to write, or HTML."""


class NoWritesStore:
    """Stands in for the store while a small message is parsed on the reactor thread."""

    def put_now(self, *args: Any, **kwargs: Any) -> Any:
        raise NotOnReactor()


NO_WRITES = NoWritesStore()
