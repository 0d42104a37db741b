"""What the cockpit uses of Twisted beyond its public API, in one place.

``twisted.mail`` offers the AUTH PLAIN and LOGIN challengers an ESMTP server needs only from
its private ``twisted.mail._cred``. ``tests/test_compat.py`` fails, naming what moved, if an
upgrade of Twisted takes them away.
"""
from __future__ import annotations

from twisted.mail._cred import LOGINCredentials, PLAINCredentials

__all__ = ["LOGINCredentials", "PLAINCredentials"]
