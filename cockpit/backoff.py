"""How long to wait before the next try, after some failures in a row."""
from __future__ import annotations


def doubling(start: float, failures: int, cap: float) -> float:
    """``start``, doubled for each failure after the first, at most ``cap``.

    ``2 ** 1024`` does not fit in a float, and a poller that retries every ``cap`` seconds reaches a
    thousand failures in hours: the exponent stops at 1023, whose product is at worst infinite.
    """
    return min(start * 2.0 ** min(max(failures - 1, 0), 1023), cap)
