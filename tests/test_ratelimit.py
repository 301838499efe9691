"""TokenBucket: pure arithmetic on the times it is given."""

from __future__ import annotations

import pytest

from gateway.ratelimit import TokenBucket


def test_a_new_bucket_holds_its_burst() -> None:
    """A client may send ``burst`` lines at once."""
    bucket = TokenBucket(10, 20, now=0.0)
    assert bucket.available(0.0) == 20
    assert bucket.full(0.0)


def test_spent_tokens_come_back_at_the_rate_up_to_the_burst() -> None:
    """Tokens refill at ``rate`` a second and never past ``burst``."""
    bucket = TokenBucket(10, 20, now=0.0)
    bucket.spend(20, 0.0)
    assert bucket.available(0.0) == 0
    assert bucket.available(0.55) == 5
    assert not bucket.full(1.0)
    assert bucket.available(100.0) == 20


@pytest.mark.parametrize(("rate", "spent", "wait"), [(10, 20, 0.1), (2, 3, 0.5), (1, 1, 1.0)])
def test_wait_is_the_time_until_the_next_whole_token(rate: float, spent: int, wait: float) -> None:
    """After the burst is spent, the next line may come in 1/rate seconds."""
    bucket = TokenBucket(rate, spent, now=5.0)
    bucket.spend(spent, 5.0)
    assert bucket.wait(5.0) == pytest.approx(wait)
    assert bucket.available(5.0 + wait) == 1
    assert bucket.wait(5.0 + wait) == 0.0
