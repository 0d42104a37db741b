"""Small things done with Deferreds in more than one place."""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred


def settled(d: Optional[Deferred[Any]]) -> Deferred[None]:
    """Fires with None once ``d`` has fired (at once for None), leaving ``d``'s own result to its chain."""
    if d is None:
        return defer.succeed(None)
    done: Deferred[None] = Deferred()

    def passed_on(result: Any) -> Any:
        done.callback(None)
        return result

    d.addBoth(passed_on)
    return done
