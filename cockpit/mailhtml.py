"""HTML mail as Markdown that links only to http, https and mailto.

Whoever shows an email event (the dashboard, Telegram) renders its Markdown body, so the
body of an HTML mail must hold no link, image or raw HTML a sender could turn against the
reader. markdownify does the conversion; :class:`SafeMarkdownConverter` decides each link
target itself and keeps text from forming Markdown of its own. Imported when the first
HTML body is converted: most mail has a plain-text body.
"""
from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import quote

# markdownify's own stub lists neither these helpers nor the converter's escape and convert_* methods
from markdownify import (MarkdownConverter, chomp,  # type: ignore[attr-defined]
                         should_remove_whitespace_inside, should_remove_whitespace_outside)

from cockpit.mailparse import LINK_SCHEMES

_URL_EDGE = "".join(map(chr, range(0x21)))  # C0 controls and space: browsers strip them from both ends of a URL
_URL_DROPPED = dict.fromkeys(map(ord, "\t\n\r"))  # and drop tabs and line ends anywhere in it
# kept as they are in a link target; the rest ("(", ")", "<", ">", "\", "`", spaces, controls,
# non-ASCII) is percent-encoded, so that a target cannot end early and let Markdown follow it
_URL_SAFE = "!#$%&'*+,-./:;=?@[]_~"
_TEXT_ESCAPES = str.maketrans({"[": "\\[", "]": "\\]", "<": "\\<"})
_BACKTICK_RUNS = re.compile(r"`+")
_WHITESPACE_RUN = re.compile(r"[\t \r\n]+")
_LINE_WITH_CONTENT = re.compile(r"^(.*)", re.M)


def _collapse_whitespace(match: re.Match[str]) -> str:
    run = match.group()
    return "\n" if "\n" in run or "\r" in run else " "


def safe_link(url: Any) -> Optional[str]:
    """``url`` as a Markdown link target if it is an absolute http, https or mailto URL, else None.

    The scheme is read as a browser reads it (bs4 has decoded character references; spaces
    and controls around it, and tabs and line ends inside it, do not count), and compared
    in ASCII. A relative URL or a bare fragment has no scheme, so it is no link either: it
    could only point into whatever site displays the mail.
    """
    if not url or not isinstance(url, str):
        return None
    url = url.strip(_URL_EDGE).translate(_URL_DROPPED)
    scheme, colon, _ = url.partition(":")
    if not colon or not scheme.isascii() or scheme.lower() not in LINK_SCHEMES:
        return None
    return quote(url, safe=_URL_SAFE, errors="replace")


class SafeMarkdownConverter(MarkdownConverter):
    """markdownify's converter whose output links only where :func:`safe_link` allows.

    A link or image with any other target keeps its text (or alt text) and loses the
    target; link and image titles are dropped. Text is escaped so that it cannot make a
    link, an autolink or HTML, and code cannot end early and leave its content to be read
    as Markdown.
    """

    options: dict[str, Any]  # set by MarkdownConverter.__init__: its defaults and the ones given

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._item_numbers: dict[int, int] = {}  # id(<li>) -> its number in its <ol>

    def process_text(self, el: Any, parent_tags: Any = None) -> str:
        # markdownify's, less its whitespace patterns, which take quadratic time on a long run of spaces
        parent_tags = parent_tags or set()
        text = str(el)
        if "pre" not in parent_tags:
            text = _WHITESPACE_RUN.sub(" " if self.options["wrap"] else _collapse_whitespace, text)
        if "_noformat" not in parent_tags:
            text = self.escape(text, parent_tags)
        if should_remove_whitespace_outside(el.previous_sibling) or (
                should_remove_whitespace_inside(el.parent) and not el.previous_sibling):
            text = text.lstrip(" \t\r\n")
        if should_remove_whitespace_outside(el.next_sibling) or (
                should_remove_whitespace_inside(el.parent) and not el.next_sibling):
            text = text.rstrip()
        return text

    def escape(self, text: str, parent_tags: Any) -> str:
        # backslashes first, so that the escapes added here and by markdownify stay escapes
        text = super().escape(text.replace("\\", "\\\\"), parent_tags)  # type: ignore[misc]  # not in the stub
        return text.translate(_TEXT_ESCAPES)

    def convert_a(self, el: Any, text: str, parent_tags: Any) -> str:
        if "_noformat" in parent_tags:
            return text
        chomped: tuple[str, str, str] = chomp(text)  # markdownify's, unannotated
        prefix, suffix, text = chomped
        if not text:
            return ""
        href = el.get("href")
        url = safe_link(href)
        if url is None:
            return prefix + text + suffix
        if self.options["autolinks"] and url == href and el.get_text() == href:
            return f"{prefix}<{url}>{suffix}"
        return f"{prefix}[{text}]({url}){suffix}"

    def convert_img(self, el: Any, text: str, parent_tags: Any) -> str:
        alt = self._attribute_text(el.attrs.get("alt"), parent_tags)
        url = safe_link(el.attrs.get("src"))
        if url is None or "_noformat" in parent_tags or (
                "_inline" in parent_tags and el.parent.name not in self.options["keep_inline_images_in"]):
            return alt
        return f"![{alt}]({url})"

    def convert_video(self, el: Any, text: str, parent_tags: Any) -> str:
        if "_inline" in parent_tags and el.parent.name not in self.options["keep_inline_images_in"]:
            return text
        src = el.attrs.get("src")
        if not src:
            source = el.find("source", attrs={"src": True})
            src = source.attrs.get("src") if source is not None else None
        src, poster = safe_link(src), safe_link(el.attrs.get("poster"))
        if src and poster:
            return f"[![{text}]({poster})]({src})"
        if src:
            return f"[{text}]({src})"
        if poster:
            return f"![{text}]({poster})"
        return text

    def convert_code(self, el: Any, text: str, parent_tags: Any) -> str:
        if "_noformat" in parent_tags:
            return text
        # a line end could let the next line open a block (a quote, a list) that cuts the code short
        text = text.replace("\n", " ")
        # Inside backticks nothing can be escaped: a tag or an autolink there outranks the code
        # span, and a "|" in a table cell ends the cell. Such code is kept as escaped text.
        if "<" in text or ("_inline" in parent_tags and "|" in text):
            return self.escape(text, parent_tags)
        return super().convert_code(el, text, parent_tags)  # type: ignore[misc,no-any-return]  # not in the stub

    convert_kbd = convert_samp = convert_code

    def convert_pre(self, el: Any, text: str, parent_tags: Any) -> str:
        if not text:
            return ""
        if "_inline" in parent_tags:  # a heading or a table cell holds a single line
            return self.convert_code(el, text, parent_tags)
        # the blank lines around go, as markdownify's strip_pre does, but in linear time
        lead = len(text) - len(text.lstrip(" \n"))
        text = text[text.rfind("\n", 0, lead) + 1:].rstrip(" \n")
        # a line of as many backticks as the fence would close it, and the rest would be Markdown
        fence = "`" * max(3, max(map(len, _BACKTICK_RUNS.findall(text)), default=0) + 1)
        return f"\n\n{fence}\n{text}\n{fence}\n\n"

    def convert_li(self, el: Any, text: str, parent_tags: Any) -> str:
        parent = el.parent
        if parent is None or parent.name != "ol":
            return super().convert_li(el, text, parent_tags)  # type: ignore[misc,no-any-return]  # not in the stub
        # markdownify counts each item's previous siblings: quadratic in a long list
        text = (text or "").strip()
        if not text:
            return "\n"
        bullet = f"{self._item_number(el, parent)}. "
        indent = " " * len(bullet)
        text = _LINE_WITH_CONTENT.sub(lambda m: indent + m.group(1) if m.group(1) else "", text)
        return bullet + text[len(bullet):] + "\n"

    def _item_number(self, el: Any, parent: Any) -> int:
        number = self._item_numbers.get(id(el))
        if number is None:
            start = str(parent.get("start") or "")
            first = int(start) if start.isdecimal() and len(start) < 10 else 1
            for n, item in enumerate(parent.find_all("li", recursive=False)):
                self._item_numbers[id(item)] = first + n
            number = self._item_numbers[id(el)]
        return number

    def _attribute_text(self, value: Any, parent_tags: Any) -> str:
        # one line: a blank line in an alt text would end the image's paragraph
        text = " ".join(str(value or "").split())
        return text if "_noformat" in parent_tags else self.escape(text, parent_tags)


def html_to_markdown(html: str) -> str:
    """The Markdown of an HTML body, with ATX headings and "-" bullets, ending in one line end."""
    return SafeMarkdownConverter(heading_style="ATX", bullets="-").convert(html).strip() + "\n"
