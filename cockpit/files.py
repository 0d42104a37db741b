"""Writing a file so that a reader, or a crash, finds the old content or the new, whole."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def is_unfinished(name: str) -> bool:
    """A temporary file that :func:`write_atomically` left behind when a crash cut it short."""
    return name.startswith(".") and name.endswith(".tmp")


def write_atomically(path: Path, data: bytes, sync_directory: bool = True) -> None:
    """Replace ``path`` by ``data`` durably: a temporary file, fsync, rename, fsync of the directory.

    With ``sync_directory=False`` the rename is left for the caller to make durable, with
    one fsync of the directory after several files are in place. Blocks on the disk: call
    it off the reactor thread.
    """
    make_directory(path.parent)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # written means on disk, not in a cache
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if sync_directory:
        sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    """fsync a directory, so that the renames and new names in it survive a crash."""
    directory = os.open(path, os.O_RDONLY)
    try:  # the rename itself is durable only once the directory is
        os.fsync(directory)
    finally:
        os.close(directory)


def make_directory(path: Path) -> None:
    """``mkdir -p``, durably: each directory made is fsynced into its parent.

    A file fsynced into a directory that a crash then loses is lost with it.
    """
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # another thread made it meanwhile
            continue
        sync_dir(directory.parent)
