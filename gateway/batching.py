"""When output should wait to go out with what follows: batching under load, not before.

Every write to a client and every script call to Redis has a fixed cost (a system call,
a TCP segment, a wake-up of the reader) whatever it carries. A room with a few messages a
second, as people write them, sends each at once. A room carrying hundreds a second (a
bot, a bridge, a benchmark) is not read line by line by anyone: there, one write per
window carrying every line that came in it costs a fraction of a write per line, and the
few milliseconds it adds are not seen.

So output is *paced* only while it is busy: above :data:`BUSY_RATE` messages a second (the
gateway's ``--batch-rate``), measured over each :data:`RATE_PERIOD` or so, it goes out at
most once per window, the first batch after a quiet spell at once; pacing ends when the
rate falls under half that (so that a rate near the line does not switch it on and off).
Nothing ever waits in a stream that has not been busy.
"""

from __future__ import annotations

__all__ = ["BUSY_RATE", "RATE_PERIOD", "Pacer"]

#: Messages a second above which output is paced, by default: ten times what a lively
#: room of people writes, and above what the fixed benchmark load puts through a room
#: (300). Lower, more streams are paced: fewer writes, each line up to a window later.
BUSY_RATE = 500.0
#: Seconds over which the rate is measured (and so how soon pacing starts and ends).
RATE_PERIOD = 0.1


class Pacer:
    """One output stream's pacing: its recent rate, and when it may next go out.

    Times are ``time.monotonic()`` seconds, passed in (the caller has one at hand, and
    tests set them)."""

    __slots__ = ("_busy", "_count", "_last_out", "_since", "rate", "window")

    def __init__(self, window: float, rate: float = BUSY_RATE) -> None:
        #: Seconds a busy stream waits between two outputs, at most (0: never waits).
        self.window = window
        #: Messages a second above which the stream is busy.
        self.rate = rate
        self._busy = False
        self._since = float("-inf")  # start of the period being counted
        self._count = 0  # messages in it so far
        self._last_out = float("-inf")

    @property
    def busy(self) -> bool:
        """Whether output is paced: the last period measured was over :attr:`rate`, or
        over half of it after a busy one."""
        return self._busy

    def arrived(self, messages: int, now: float) -> None:
        """``messages`` came in to be sent."""
        self._count += messages
        elapsed = now - self._since
        if elapsed >= RATE_PERIOD:
            # Counted with what came now: paced output comes in lumps a window apart, and
            # a period closed before its last lump would see half the rate.
            line = self.rate / 2 if self._busy else self.rate
            self._busy = self._count > line * elapsed
            self._since, self._count = now, 0

    def due(self, now: float) -> float:
        """When output may go out: ``now`` if at once, else the later time to wait for."""
        if not self._busy or not self.window:
            return now
        return max(now, self._last_out + self.window)

    def sent(self, now: float) -> None:
        """Output went out at ``now``."""
        self._last_out = now
