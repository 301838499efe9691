"""Token buckets: how fast one client may send lines, and how much flooding is tolerated."""

from __future__ import annotations


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

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means "over the limit"."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class FloodGuard:
    """Per-client flood control: a line bucket, and a second bucket for dropped lines.

    Lines beyond the rate are dropped (the client is told once per episode). A client that
    keeps flooding far past the rate runs out of the second bucket and is disconnected:
    it may exceed the rate by ``ABUSE_FACTOR`` bursts before refills catch up, so a fast
    typist or a paste is merely throttled while a flooding script is cut within seconds.
    """

    ABUSE_FACTOR = 5

    __slots__ = ("_dropped", "_lines", "throttled")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._lines = TokenBucket(rate, burst, now)
        self._dropped = TokenBucket(rate, burst * self.ABUSE_FACTOR, now)
        #: True from a dropped line until the next accepted one.
        self.throttled = False

    def check(self, now: float) -> str:
        """What to do with a line that arrives at ``now``: "ok" handle it; "slow" drop it
        and tell the client (first drop of an episode); "drop" drop it silently; "abuse"
        disconnect the client."""
        if self._lines.take(now):
            self.throttled = False
            return "ok"
        if not self._dropped.take(now):
            return "abuse"
        first, self.throttled = not self.throttled, True
        return "slow" if first else "drop"
