"""A mail parser process: ``python -m cockpit.parse_worker <store root> <public url>``.

It reads received messages on stdin, parses each with :func:`cockpit.mailparse.parse_mail`
(writing its attachments to the store), and answers each on stdout, in the order received.
The cockpit runs ``[mail] parsers`` of them (:mod:`cockpit.parse_pool`), so that parsing
uses every core and a message that hangs or crashes the parser takes down only this process.

Frames, both ways, are a fixed header and a payload:

- in: ``>QII`` (id, envelope length, message length), the envelope as a JSON list
  ``[sender, recipients]``, then the message as received (dot-stuffed);
- out: ``>QBI`` (id, kind, payload length), then the payload: the event's JSON for
  ``EVENT``, ``[code, text]`` as JSON for ``REFUSED``, a sentence for ``STORE_FAILED`` and
  ``FAILED``. The first frame out is ``READY`` (id 0, empty).

Log lines (a message kept whole, a parser failure) go to stderr as ``<level>| <text>``; the
cockpit logs them at that level. Anything else on stderr is logged as a warning.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

IN_HEADER = struct.Struct(">QII")
OUT_HEADER = struct.Struct(">QBI")
READY, EVENT, REFUSED, STORE_FAILED, FAILED = range(5)
LEVEL_MARK = "| "  # a log line on stderr: "<level>| <text>"
FLUSH_AFTER = 0.01  # seconds: outcomes of a batch wait at most this long for the rest of it
READ_SIZE = 1 << 20


def request(job_id: int, envelope: list[Any], chunks: list[bytes], size: int) -> list[bytes]:
    """The frame for one message, as pieces for ``writeSequence``."""
    meta = json.dumps(envelope, separators=(",", ":")).encode()
    return [IN_HEADER.pack(job_id, len(meta), size), meta, *chunks]


class WallClock:
    """The clock of this process, which runs no reactor: its root, :func:`main`, hands it on."""

    seconds = staticmethod(time.time)


def serve(store_root: str, public_url: str, clock: WallClock) -> None:
    """Parse until stdin ends; ``clock`` dates what is stored and paces the answers' flushes."""
    # frames go out on a copy of stdout; whatever else writes to stdout lands on stderr
    stdout: BinaryIO = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from twisted.logger import ILogObserver, eventAsText, globalLogBeginner

    from cockpit.mailparse import Envelope, MessageRefused, parse_mail, unstuff
    from cockpit.store import Store

    def to_stderr(event: dict[str, Any]) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False) or ""
        level = getattr(event.get("log_level"), "name", "info")
        sys.stderr.write("".join(f"{level}{LEVEL_MARK}{line}\n" for line in text.splitlines()))
        sys.stderr.flush()

    # a plain callable is a log observer; the stubs want the interface
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, to_stderr)], redirectStandardIO=False)
    store = Store(Path(store_root), public_url, clock)

    def outcome(raw: bytes, envelope: Envelope) -> tuple[int, bytes]:
        try:
            return EVENT, parse_mail(unstuff([raw]), envelope, store).to_json()
        except MessageRefused as exc:
            return REFUSED, json.dumps([exc.code, exc.text]).encode()
        except OSError as exc:
            return STORE_FAILED, str(exc).encode("utf-8", "replace")
        except Exception as exc:  # parse_mail keeps what it cannot split; this is a bug
            import traceback

            traceback.print_exc()
            return FAILED, f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")

    stdout.write(OUT_HEADER.pack(0, READY, 0))
    stdout.flush()
    buffer = bytearray()
    while True:
        data = os.read(0, READ_SIZE)
        if not data:
            return  # the cockpit closed our stdin: it is stopping
        buffer += data
        start = 0
        out: list[bytes] = []
        since = clock.seconds()
        while len(buffer) - start >= IN_HEADER.size:
            job_id, meta_size, size = IN_HEADER.unpack_from(buffer, start)
            end = start + IN_HEADER.size + meta_size + size
            if len(buffer) < end:
                break
            meta = json.loads(bytes(buffer[start + IN_HEADER.size:start + IN_HEADER.size + meta_size]))
            raw = bytes(buffer[end - size:end])
            start = end
            kind, payload = outcome(raw, Envelope(*meta))
            out += (OUT_HEADER.pack(job_id, kind, len(payload)), payload)
            if clock.seconds() - since > FLUSH_AFTER:
                stdout.write(b"".join(out))
                stdout.flush()
                out, since = [], clock.seconds()
        del buffer[:start]
        if out:
            stdout.write(b"".join(out))
            stdout.flush()


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m cockpit.parse_worker <store root> <public url>")
    try:
        serve(sys.argv[1], sys.argv[2], WallClock())
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
