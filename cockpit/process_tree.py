"""Every process below one, found through ``/proc`` and killed without letting one fork away.

Linux only, stdlib only: the action worker imports this before anything else.
A process that is the *child subreaper* (:func:`become_subreaper`) inherits its orphaned
descendants, even those that called ``setsid``, so that everything an action started stays
below its worker and :func:`kill_descendants` finds it.
"""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Optional

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MAX_SWEEPS = 64  # a tree that still grows after this many sweeps is a fork bomb outracing us: kill what we hold

_libc: Optional[ctypes.CDLL] = None
_children_files: Optional[bool] = None  # whether /proc/<pid>/task/<tid>/children exists (CONFIG_PROC_CHILDREN)


def _prctl(option: int, value: int) -> bool:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        done: int = _libc.prctl(option, value, 0, 0, 0)
        return done == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where Linux does not allow it."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies."""
    return _prctl(PR_SET_PDEATHSIG, signum)


def _read_ints(path: str) -> list[int]:
    try:
        with open(path, "rb") as handle:
            return [int(word) for word in handle.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # the command name may hold spaces and parentheses: the fields start after the last ")"
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(name))
    return found


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (zombies included); [] once it is gone."""
    global _children_files
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    if _children_files is None:
        _children_files = os.path.exists("/proc/thread-self/children")
    if not _children_files:
        return _children_by_scan(pid)
    found: list[int] = []
    for tid in tasks:
        found.extend(_read_ints(f"/proc/{pid}/task/{tid}/children"))
    return found


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
        return True
    except (ProcessLookupError, PermissionError):  # gone, or it ran a set-user-ID program
        return False


def kill_descendants(root: int, freeze_root: bool = False) -> list[int]:
    """SIGKILL every process below ``root``; returns their pids. ``root`` itself lives on.

    Each is stopped (SIGSTOP) before its children are read, top-down, and the tree is swept
    again until a sweep finds nothing new, so nothing forks away between finding and
    killing; then they are killed, deepest first. A stopped parent reaps nobody, so no
    pid signalled can have been reused. ``freeze_root`` stops ``root`` too for the
    duration (and continues it), for a root that reaps; a process cannot freeze itself.
    """
    if freeze_root and not _signal(root, signal.SIGSTOP):
        return []
    found: dict[int, None] = {}  # in the order found: parents before their children
    try:
        for _ in range(MAX_SWEEPS):
            queue = [root, *found]
            grew = False
            for pid in queue:  # grows as it goes: a child found is read in the same sweep
                for child in children(pid):
                    if child not in found and _signal(child, signal.SIGSTOP):
                        found[child] = None
                        queue.append(child)
                        grew = True
            if not grew:
                break
        for pid in reversed(found):
            _signal(pid, signal.SIGKILL)
    finally:
        if freeze_root:
            _signal(root, signal.SIGCONT)
    return list(found)


def reap_children(killed: list[int]) -> None:
    """Wait for the children this process has, ``killed`` among them, until none is left.

    Run by a subreaper after :func:`kill_descendants` on itself: every process killed ends
    up its child (an orphan comes to the subreaper), so each wait returns; a child that was
    not killed and does not end keeps this waiting only if it was among ``killed``.
    """
    waiting = set(killed)
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if waiting else os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        waiting.discard(pid)
