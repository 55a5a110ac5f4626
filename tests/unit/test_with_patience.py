"""Registration at the end of training retries a store that is down, and only that."""

from __future__ import annotations

import pytest

from medsup.tracking.registry import with_patience
from medsup.tracking.uri import TrackingUnavailable


def test_retries_an_unavailable_store_until_it_answers() -> None:
    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise TrackingUnavailable("connection refused")
        return 7

    assert with_patience(flaky, patience_s=30, what="register", first_delay_s=0.01) == 7
    assert len(calls) == 3


def test_gives_up_after_the_patience_and_never_retries_other_errors() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise TrackingUnavailable("connection refused")

    with pytest.raises(TrackingUnavailable):
        with_patience(down, patience_s=0.5, what="register")
    assert len(calls) == 1  # the first backoff (1 s) would overrun the patience

    def refused() -> None:
        calls.append(1)
        raise ValueError("MLflow refused the name")

    calls.clear()
    with pytest.raises(ValueError, match="refused"):
        with_patience(refused, patience_s=30, what="register")
    assert len(calls) == 1
