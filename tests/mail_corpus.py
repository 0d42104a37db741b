"""A generated corpus of malformed and hostile mail, for the SMTP server to survive.

``corpus()`` returns ``[(name, raw bytes)]``: at least 300 messages, the same ones on every
run (a fixed seed). Each family stresses one way mail goes wrong in the wild.
"""
from __future__ import annotations

import base64
import random
from typing import Callable, Iterator

DOMAIN = b"cockpit.example.com"
Message = tuple[str, bytes]


def _headers(subject: bytes = b"corpus", extra: bytes = b"") -> bytes:
    return (b"From: Sender <sender@example.org>\r\nTo: ops@" + DOMAIN + b"\r\nSubject: " + subject + b"\r\n"
            b"Message-ID: <corpus@example.org>\r\nMIME-Version: 1.0\r\n" + extra)


def broken_boundaries(rng: random.Random) -> Iterator[Message]:
    bodies = [
        b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nno boundary param\r\n--x--\r\n",
        b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n\r\nempty boundary\r\n----\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: text/plain\r\n\r\nnever closed\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--b\r\n\r\nwrong boundary\r\n--b--\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\nno parts at all\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a--\r\n",
        b"Content-Type: multipart/alternative; boundary=a\r\n\r\n--a\r\n--a\r\n--a\r\n--a--\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n"
        b"--a\r\n\r\nsame boundary inside\r\n--a--\r\n--a--\r\n",
        b"Content-Type: multipart/mixed; boundary=" + b"b" * 200 + b"\r\n\r\n--" + b"b" * 200 + b"\r\n\r\nlong\r\n",
        b"Content-Type: multipart/; boundary=a\r\n\r\n--a\r\n\r\nno subtype\r\n--a--\r\n",
        b"Content-Type: multipart/mixed; boundary=a; boundary=b\r\n\r\n--b\r\n\r\ntwo boundaries\r\n--b--\r\n",
        b"Content-Type: multipart/mixed; boundary=\"a\r\n\r\n--a\r\n\r\nunterminated quote\r\n--a--\r\n",
    ]
    for n, body in enumerate(bodies):
        yield f"boundary-{n}", _headers(b"boundary") + body
    for n in range(18):
        boundary = bytes(rng.choice(b"abcXYZ0123'()+_,-./:=? ") for _ in range(rng.randint(1, 70)))
        parts = b"".join(b"--" + boundary[: rng.randint(0, len(boundary))] + b"\r\nContent-Type: text/plain\r\n\r\n"
                         b"part\r\n" for _ in range(rng.randint(0, 5)))
        yield f"boundary-random-{n}", _headers(b"random boundary", b"Content-Type: multipart/mixed; boundary=\""
                                               + boundary + b"\"\r\n\r\n") + parts


def bad_charsets(rng: random.Random) -> Iterator[Message]:
    charsets = [b"x-unknown", b"", b"utf-8\x00", b"\"utf-8", b"rot13", b"hex", b"base64", b"zlib", b"utf-7",
                b"utf-16", b"utf-32", b"idna", b"punycode", b"../../etc", b"a" * 300, b"iso-8859-1; charset=koi8-r",
                b"us-ascii", b"utf-8''", b"unicode-1-1-utf-7", b"cp65001", b"mbcs", b"uu_codec", b"bz2", b"quopri"]
    payloads = [b"caf\xc3\xa9", b"\xff\xfe\xfa\x00\x01", b"+AGEAYgBj-", b"\xe2\x82", b"plain ascii"]
    for n, charset in enumerate(charsets):
        for m, payload in enumerate(payloads[: 1 + n % len(payloads)]):
            yield f"charset-{n}-{m}", _headers(b"charset", b"Content-Type: text/plain; charset=" + charset
                                               + b"\r\n\r\n" + payload + b"\r\n")
    for n, charset in enumerate(charsets[:12]):
        yield f"charset-html-{n}", _headers(b"charset html", b"Content-Type: text/html; charset=" + charset +
                                            b"\r\n\r\n<p>\xe9t\xe9 <b>\xff</b></p>\r\n")
        yield f"charset-header-{n}", _headers(b"=?" + charset + b"?q?caf=C3=A9?= =?" + charset + b"?b?////?=",
                                              b"Content-Type: text/plain\r\n\r\nbody\r\n")


def garbage_base64(rng: random.Random) -> Iterator[Message]:
    for n in range(30):
        kind = n % 5
        if kind == 0:
            payload = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
        elif kind == 1:
            payload = base64.b64encode(rng.randbytes(300))[:-rng.randint(1, 3)]  # bad padding
        elif kind == 2:
            payload = b"!!!!@@@@####" * rng.randint(1, 50)
        elif kind == 3:
            payload = b"===" + base64.b64encode(rng.randbytes(100)) + b"===abc"
        else:
            payload = base64.b64encode(rng.randbytes(2000)).replace(b"A", b"\r\n")
        disposition = b"Content-Disposition: attachment; filename=\"blob.bin\"\r\n" if n % 2 else b""
        maintype = [b"text/plain", b"application/octet-stream", b"image/png", b"text/html"][n % 4]
        yield f"base64-{n}", _headers(b"base64", b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n"
                                      b"Content-Type: " + maintype + b"\r\nContent-Transfer-Encoding: base64\r\n"
                                      + disposition + b"\r\n" + payload + b"\r\n--q--\r\n")
    for n, encoding in enumerate([b"quoted-printable", b"x-uuencode", b"7bit", b"binary", b"bogus", b"base64 ; x"]):
        yield f"transfer-encoding-{n}", _headers(b"cte", b"Content-Type: text/plain\r\nContent-Transfer-Encoding: "
                                                 + encoding + b"\r\n\r\n=ZZ=\r\n=\r\nbegin 644 x\r\n=4=3D\r\n")


def missing_headers(rng: random.Random) -> Iterator[Message]:
    cases = [
        b"",
        b"\r\n",
        b"\r\n\r\n\r\n",
        b"no headers, just a body\r\n",
        b"Subject: only a subject\r\n\r\nbody\r\n",
        b"From: only-from@example.org\r\n\r\nbody\r\n",
        b"To: ops@" + DOMAIN + b"\r\n\r\nbody\r\n",
        b"From:\r\nTo:\r\nSubject:\r\nMessage-ID:\r\n\r\nempty headers\r\n",
        b"From: <>\r\nTo: <>, ,,, <@>\r\nCc: undisclosed-recipients:;\r\n\r\nempty addresses\r\n",
        b"From: \"unterminated <a@example.org>\r\nTo: a@@b@@c\r\n\r\nbad addresses\r\n",
        b"header without colon\r\nSubject: x\r\n\r\nbody\r\n",
        b" continuation first\r\nSubject: x\r\n\r\nbody\r\n",
        b"Subject: x\r\nContent-Type:\r\n\r\nempty content type\r\n",
        b"Subject: x\r\nContent-Type: ;;;\r\n\r\nsemicolons\r\n",
        b"Subject: x\r\nContent-Type: text\r\n\r\nno slash\r\n",
        b"Subject: x\r\nContent-Disposition: attachment\r\n\r\nthe whole message is an attachment\r\n",
        b"Subject: x\r\nContent-Type: application/pdf\r\n\r\n%PDF-not-really\r\n",
        b"Subject: x\r\nContent-Type: message/rfc822\r\n\r\n",
        b"Subject: x\r\nContent-Type: message/rfc822\r\n\r\nnot a message at all\r\n",
        b"Subject: bare LF\nFrom: lf@example.org\n\nbody with bare line feeds\nline two\n",
        b"Subject: bare CR\rFrom: cr@example.org\r\rbody\r",
        b"Subject: \x00nul\x00\r\n\r\nnul \x00 bytes\r\n",
        b"Subject: x\r\n\r\n.\r\n..\r\n...\r\n. leading dots\r\n",
    ]
    for n, raw in enumerate(cases):
        yield f"missing-{n}", raw
    for n in range(12):
        names = rng.sample([b"From", b"To", b"Cc", b"Subject", b"Message-ID", b"Date", b"MIME-Version"], 3)
        raw = b"".join(name + b": " + rng.choice([b"", b"x", b"=?", b"<", b"@", b"\t"]) + b"\r\n" for name in names)
        yield f"missing-random-{n}", raw + b"\r\nbody\r\n"


def eight_bit_headers(rng: random.Random) -> Iterator[Message]:
    values = [b"caf\xc3\xa9", b"caf\xe9", b"\xff\xfe\xfd", b"\xe2\x80\xae reversed", b"\xf0\x9f\x94\xa5 fire",
              b"\xed\xa0\x80 surrogate", b"\xc0\xaf overlong", b"\x1b[31m escape", b"\x7f\x80\x81"]
    for n, value in enumerate(values):
        yield f"8bit-subject-{n}", _headers(value) + b"Content-Type: text/plain\r\n\r\nbody\r\n"
        yield f"8bit-from-{n}", (b"From: " + value + b" <s" + value + b"@example.org>\r\nTo: ops@" + DOMAIN +
                                 b"\r\nSubject: from\r\n\r\nbody\r\n")
        yield f"8bit-filename-{n}", _headers(b"8bit name", b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
                                             b"--q\r\nContent-Type: application/octet-stream\r\n"
                                             b"Content-Disposition: attachment; filename=\"" + value +
                                             b".txt\"\r\n\r\ndata\r\n--q--\r\n")
        yield f"8bit-body-{n}", _headers(b"8bit body", b"Content-Type: text/plain\r\n\r\n" + value + b"\r\n")
    for n in range(10):
        garbage = bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 60)))
        yield f"8bit-random-{n}", _headers(garbage, b"X-" + garbage[:5] + b": " + garbage + b"\r\n\r\nbody\r\n")


def long_lines(rng: random.Random) -> Iterator[Message]:
    for n, size in enumerate([998, 999, 1000, 1001, 4096, 20000, 100_000, 1_000_000]):
        yield f"long-body-{n}", _headers(b"long body", b"Content-Type: text/plain\r\n\r\n" + b"x" * size + b"\r\n")
        yield f"long-subject-{n}", _headers(b"s" * size, b"\r\nbody\r\n")
    to = b", ".join(b"user%d@example.org" % i for i in range(3000))
    yield "long-to", b"From: a@example.org\r\nTo: " + to + b"\r\nSubject: many\r\n\r\nbody\r\n"
    yield "many-headers", b"".join(b"X-H%d: v\r\n" % i for i in range(20000)) + b"Subject: many\r\n\r\nbody\r\n"
    yield "long-folded", b"Subject: " + b"\r\n ".join([b"fold"] * 5000) + b"\r\n\r\nbody\r\n"
    yield "long-param", _headers(b"param", b"Content-Type: text/plain; name=\"" + b"n" * 50000 + b"\"\r\n\r\nbody\r\n")
    yield "long-base64-line", _headers(b"b64 line", b"Content-Type: application/octet-stream\r\n"
                                       b"Content-Transfer-Encoding: base64\r\n\r\n"
                                       + base64.b64encode(rng.randbytes(300_000)) + b"\r\n")


def deep_nesting(rng: random.Random) -> Iterator[Message]:
    for depth in (5, 20, 31, 32, 33, 50, 200, 3000):
        opening = b"".join(b"Content-Type: multipart/mixed; boundary=\"d%d\"\r\n\r\n--d%d\r\n" % (i, i)
                           for i in range(depth))
        closing = b"".join(b"--d%d--\r\n" % i for i in reversed(range(depth)))
        yield f"nested-{depth}", _headers(b"nested") + opening + b"Content-Type: text/plain\r\n\r\ncore\r\n" + closing
        yield f"nested-unclosed-{depth}", _headers(b"nested unclosed") + opening + b"\r\ncore\r\n"


def bomb_nesting(rng: random.Random) -> Iterator[Message]:
    for depth in (3, 10, 40, 300):
        inner = b"Subject: core\r\n\r\ncore\r\n"
        for i in range(depth):
            inner = b"Subject: level %d\r\nContent-Type: message/rfc822\r\n\r\n" % i + inner
        yield f"rfc822-nested-{depth}", _headers(b"rfc822 nest", b"Content-Type: multipart/mixed; boundary=r\r\n\r\n"
                                                 b"--r\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--r--\r\n")
    for count in (100, 499, 501, 2000):
        parts = b"".join(b"--m\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; "
                         b"filename=\"f.bin\"\r\n\r\n%d\r\n" % i for i in range(count))
        yield f"many-parts-{count}", _headers(b"many parts", b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
                                              + parts + b"--m--\r\n")
    payload = b"A" * 100
    for level in range(4):  # base64 inside base64 inside base64 ...
        payload = base64.b64encode(b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
                                   b"\r\n\r\n" + payload)
        yield f"base64-in-base64-{level}", _headers(b"b64 nest", b"Content-Type: message/rfc822\r\n"
                                                    b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"\r\n")
    zeros = base64.encodebytes(bytes(400_000))
    yield "zeros", _headers(b"zeros", b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
                                      b"Content-Disposition: attachment; filename=zeros.bin\r\n\r\n" + zeros)


def traversal_filenames(rng: random.Random) -> Iterator[Message]:
    names = [b"../../../../etc/passwd", b"/etc/shadow", b"..\\..\\windows\\system32\\cmd.exe", b"C:\\boot.ini",
             b"..", b".", b"...", b".htaccess", b"%2e%2e%2fetc%2fpasswd", b"a/../../b", b"\x00.txt", b"con",
             b"=?utf-8?q?=2E=2E=2F=2E=2E=2Fetc=2Fpasswd?=", b"=?utf-8?b?Li4vLi4vZXRjL3Bhc3N3ZA==?=", b"\r\nX-Evil: 1",
             b"name\twith\ttabs", b"\xe2\x80\xaetxt.exe", b"file.meta", b"a" * 500 + b".pdf", b"  spaced  .txt  ",
             b"\"quoted\".txt", b"<script>.html", b"%00", b"~/.ssh/authorized_keys", b"|rm -rf|"]
    for n, name in enumerate(names):
        yield f"traversal-{n}", _headers(b"traversal", b"Content-Type: multipart/mixed; boundary=t\r\n\r\n"
                                         b"--t\r\nContent-Type: application/octet-stream\r\n"
                                         b"Content-Disposition: attachment; filename=\"" + name + b"\"\r\n\r\n"
                                         b"payload %d\r\n--t--\r\n" % n)
    for n, encoded in enumerate([b"UTF-8''..%2F..%2Fetc%2Fpasswd", b"UTF-8''%2Fetc%2Fpasswd", b"UTF-8''%00%2e%2e",
                                 b"x-unknown''%FF%FE", b"''", b"UTF-8'en'%E2%80%AE.exe"]):
        yield f"traversal-2231-{n}", _headers(b"traversal 2231", b"Content-Type: multipart/mixed; boundary=t\r\n\r\n"
                                              b"--t\r\nContent-Type: text/plain; name*=" + encoded + b"\r\n"
                                              b"Content-Disposition: attachment; filename*=" + encoded + b"\r\n\r\n"
                                              b"x\r\n--t--\r\n")
    yield "traversal-continuations", _headers(b"2231 continuations", b"Content-Type: multipart/mixed; boundary=t\r\n"
                                              b"\r\n--t\r\nContent-Type: application/octet-stream\r\n"
                                              b"Content-Disposition: attachment; filename*0=\"../..\"; "
                                              b"filename*1=\"/etc/\"; filename*2=\"passwd\"\r\n\r\nx\r\n--t--\r\n")


FAMILIES: list[Callable[[random.Random], Iterator[Message]]] = [
    broken_boundaries, bad_charsets, garbage_base64, missing_headers, eight_bit_headers, long_lines,
    deep_nesting, bomb_nesting, traversal_filenames,
]


def corpus(seed: int = 3) -> list[Message]:
    rng = random.Random(seed)
    messages = [message for family in FAMILIES for message in family(rng)]
    assert len({name for name, _ in messages}) == len(messages), "corpus names must be unique"
    return messages
