"""A content-addressed file store (CuisineStor semantics, docs/design.md §6) and its read-only HTTP resource.

A file lives at ``<root>/<space>/<h[0:2]>/<h[2:4]>/<h>`` where ``h`` is the sha256 hex
of its content, next to a ``<h>.meta`` JSON sidecar (original filename, content type,
size, time). Identical content is stored once. Writes go to a temporary file that is
renamed into place, off the reactor thread.

Reading serves regular files only: every directory from the root down, the file and its
sidecar are opened without following a symbolic link, and the file is checked on the
descriptor it is served from, so nothing planted in the tree leads elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional
from urllib.parse import quote

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.basic import FileSender
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request

from cockpit.files import write_atomically

log = Logger()

SPACE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
# type/subtype made of RFC 7230 token characters; anything else is served as octet-stream
CONTENT_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")
DEFAULT_TYPE = "application/octet-stream"
MAX_META = 65536  # bytes; a larger sidecar is not one this store wrote

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# NONBLOCK: opening a FIFO planted in the tree would otherwise wait for a writer
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_regular(name: str, dir_fd: int) -> Optional[tuple[int, os.stat_result]]:
    """``name`` in the directory ``dir_fd``, opened if it is a regular file and no link: (fd, its stat)."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode):
            os.set_blocking(fd, True)
            return fd, status
    except OSError:
        pass
    os.close(fd)
    return None


def _read_meta_at(name: str, dir_fd: int) -> Optional[dict[str, Any]]:
    opened = _open_regular(name, dir_fd)
    if opened is None:
        return None
    fd, status = opened
    with os.fdopen(fd, "rb") as handle:
        if status.st_size > MAX_META:
            return None
        data = handle.read(MAX_META + 1)
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and len(data) <= MAX_META else None


class StoreError(ValueError):
    """A request the store cannot take (a bad space name); ``str()`` says why."""


@dataclass(frozen=True)
class StoredFile:
    """One stored file: where it is on disk and under which URL it is served."""

    space: str
    hash: str
    path: Path
    url: str
    filename: str
    content_type: str
    size: int
    time: float


def clean_content_type(value: Optional[str]) -> str:
    """``type/subtype`` in lower case, or application/octet-stream when it is not one."""
    value = (value or "").split(";", 1)[0].strip().lower()
    return value if CONTENT_TYPE_RE.match(value) else DEFAULT_TYPE


def content_disposition(filename: str) -> str:
    """Always ``attachment`` (never rendered in the cockpit's origin) with an ASCII and an RFC 5987 name."""
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in filename) or "file"
    return f'attachment; filename="{ascii_name}"; filename*=UTF-8\'\'{quote(filename, safe="")}'


class Store:
    """Content-addressed files under ``root``, served below ``<public_url>/store/``."""

    def __init__(self, root: Path, public_url: str, reactor: Any):
        """``reactor``: its thread pool writes for :meth:`put`; its ``seconds()`` dates a stored file."""
        self.root = Path(root)
        self.public_url = public_url.rstrip("/")
        self.reactor = reactor

    # -- writing ------------------------------------------------------------
    def put(self, space: str, data: bytes, filename: str, content_type: str) -> Deferred[StoredFile]:
        """Store ``data`` off the reactor thread; fires with its :class:`StoredFile`."""
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         self.put_now, space, data, filename, content_type)

    def put_now(self, space: str, data: bytes, filename: str, content_type: str) -> StoredFile:
        """:meth:`put` for code that already runs in a thread: it blocks on the disk."""
        if not SPACE_RE.match(space):
            raise StoreError(f"space: expected lower-case letters, digits, - or _, got {space!r}")
        digest = hashlib.sha256(data).hexdigest()
        directory = self.root / space / digest[:2] / digest[2:4]
        path = directory / digest
        meta_path = directory / (digest + ".meta")
        if path.exists() and meta_path.exists():
            meta = self._read_meta(meta_path)
            if meta is not None:
                return self._stored(space, digest, path, meta)
        meta = {"filename": filename, "content_type": clean_content_type(content_type),
                "size": len(data), "time": self.reactor.seconds(), "hash": digest}
        if not path.exists():
            write_atomically(path, data, sync_directory=False)
        # the sidecar last: a file with its .meta is complete. Both are in one directory,
        # whose fsync after the second rename makes the two durable.
        write_atomically(meta_path, json.dumps(meta, ensure_ascii=False).encode())
        return self._stored(space, digest, path, meta)

    # -- reading ------------------------------------------------------------
    def url(self, space: str, digest: str) -> str:
        return f"{self.public_url}/store/{space}/{digest[:2]}/{digest[2:4]}/{digest}"

    def _stored(self, space: str, digest: str, path: Path, meta: dict[str, Any],
                size: Optional[int] = None) -> StoredFile:
        return StoredFile(space=space, hash=digest, path=path, url=self.url(space, digest),
                          filename=str(meta.get("filename", digest)),
                          content_type=clean_content_type(meta.get("content_type")),
                          size=int(meta.get("size", 0)) if size is None else size,
                          time=float(meta.get("time", 0)))

    @staticmethod
    def _read_meta(meta_path: Path) -> Optional[dict[str, Any]]:
        try:
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def open(self, segments: list[str]) -> Optional[tuple[StoredFile, BinaryIO]]:
        """The file named by exactly ``[space, aa, bb, hash]`` and a handle to read it, or None.

        Blocks on the disk. Only a regular file with its sidecar is found, reached from the
        root without following a link; the size is the opened file's own.
        """
        if len(segments) != 4:
            return None
        space, aa, bb, digest = segments
        if not (SPACE_RE.match(space) and HASH_RE.match(digest) and aa == digest[:2] and bb == digest[2:4]):
            return None
        try:
            held = [os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        except OSError:
            return None
        try:
            for name in (space, aa, bb):
                held.append(os.open(name, _DIRECTORY_FLAGS, dir_fd=held[-1]))
            meta = _read_meta_at(digest + ".meta", held[-1])
            opened = _open_regular(digest, held[-1]) if meta is not None else None
        except OSError:
            return None
        finally:
            for fd in held:
                os.close(fd)
        if meta is None or opened is None:
            return None
        fd, status = opened
        stored = self._stored(space, digest, self.root / space / aa / bb / digest, meta, status.st_size)
        return stored, os.fdopen(fd, "rb")

    def lookup(self, segments: list[str]) -> Optional[StoredFile]:
        """The file named by exactly ``[space, aa, bb, hash]``, or None (blocks on the disk); see :meth:`open`."""
        opened = self.open(segments)
        if opened is None:
            return None
        stored, handle = opened
        handle.close()
        return stored

    def get(self, space: str, digest: str) -> Deferred[Optional[StoredFile]]:
        """Fires with the :class:`StoredFile` of ``digest`` in ``space``, or None."""
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.lookup,
                                         [space, digest[:2], digest[2:4], digest])

    def resource(self) -> resource.IResource:
        """The read-only resource mounted at /store: a file by its full path, 404 for anything else."""
        return StoreResource(self)


class StoreResource(resource.Resource):
    """Serves ``<space>/aa/bb/<hash>`` (the path segments after /store/); never lists anything."""

    isLeaf = True

    def __init__(self, store: Store):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's own, unannotated
        self.store = store

    def render_HEAD(self, request: Request) -> Any:
        return self.render_GET(request)

    def render_GET(self, request: Request) -> Any:
        try:
            # twisted has already percent-decoded each segment: "%2e%2e" arrives as "..", which
            # the strict pattern refuses like any other name that is not a full path
            assert request.postpath is not None  # set by the resource traversal that reached this leaf
            segments = [s.decode("ascii") for s in request.postpath]
        except UnicodeDecodeError:
            return self._not_found(request)
        d = threads.deferToThreadPool(self.store.reactor, self.store.reactor.getThreadPool(),
                                      self._open, segments)
        d.addCallback(self._send, request)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _open(self, segments: list[str]) -> Optional[tuple[StoredFile, BinaryIO]]:
        return self.store.open(segments)

    def _send(self, opened: Optional[tuple[StoredFile, Any]], request: Request) -> None:
        if opened is None:
            request.write(self._not_found(request))
            request.finish()
            return
        stored, handle = opened
        request.setHeader(b"Content-Type", stored.content_type.encode("ascii"))
        request.setHeader(b"Content-Length", str(stored.size).encode("ascii"))
        request.setHeader(b"Content-Disposition", content_disposition(stored.filename).encode("ascii"))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"sandbox")
        # content never changes under a content address
        request.setHeader(b"Cache-Control", b"public, max-age=31536000, immutable")
        if request.method == b"HEAD":
            handle.close()
            request.finish()
            return
        finished = request.notifyFinish()
        sender = FileSender()
        d = sender.beginFileTransfer(handle, request)

        def done(_: Any) -> None:
            handle.close()
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()

        d.addBoth(done)

        def gone(_: Failure) -> None:  # a client that goes away stops the transfer
            if sender.consumer:
                sender.stopProducing()

        finished.addErrback(gone)

    def _failed(self, failure: Any, request: Request) -> None:
        log.failure("store: serving {path} failed", failure, path=request.path.decode(errors="replace"))
        if not request.finished:
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"application/json")
            request.write(b'{"error": "the file could not be read; the cockpit\'s log has the details"}')
            request.finish()

    @staticmethod
    def _not_found(request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"error": "no such file"}'
