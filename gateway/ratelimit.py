"""Token buckets: how fast one client's lines are taken in."""

from __future__ import annotations

#: Slack for floating-point sums: a token due "now" by the clock's arithmetic is there.
_EPSILON = 1e-9


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; a line costs one token.

    Pure arithmetic on the times it is given, so tests need no clock.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def available(self, now: float) -> int:
        """Whole tokens there are at ``now``: lines that may be taken in at once."""
        self._refill(now)
        return int(self._tokens + _EPSILON)

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled: the client has been within its rate a while."""
        self._refill(now)
        return self._tokens + _EPSILON >= self.burst

    def spend(self, n: int, now: float) -> None:
        """Spend ``n`` tokens (at most what :meth:`available` said)."""
        self._refill(now)
        self._tokens -= n

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until a whole token is there."""
        self._refill(now)
        return max(0.0, (1 - self._tokens - _EPSILON) / self.rate)
