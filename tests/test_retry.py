"""The retry policy (dumpwatch/retry.py) retries only what can heal, with back-off, and not forever."""

from __future__ import annotations

import errno

import pytest

from dumpwatch import retry


def test_transient_errors_are_retried_with_back_off(monkeypatch):
    naps: list[float] = []
    monkeypatch.setattr(retry, "retrying", retry.retrying.copy(sleep=naps.append))
    outcomes = iter([OSError(errno.EBUSY, "busy"), OSError(errno.ESTALE, "stale"), "placed"])

    def flaky() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert retry.retry_transient(flaky) == "placed"
    assert len(naps) == 1 and naps[0] > 0  # the first try is plain, then tenacity waits


def test_permanent_errors_are_not_retried(monkeypatch):
    naps: list[float] = []
    monkeypatch.setattr(retry, "retrying", retry.retrying.copy(sleep=naps.append))
    calls = []

    def refused() -> None:
        calls.append(1)
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        retry.retry_transient(refused)
    assert calls == [1] and naps == []


def test_retries_stop_after_five_attempts(monkeypatch):
    naps: list[float] = []
    monkeypatch.setattr(retry, "retrying", retry.retrying.copy(sleep=naps.append))
    calls = []

    def broken() -> None:
        calls.append(1)
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        retry.retry_transient(broken)
    assert len(calls) == 6  # the plain try, then five under the policy
    assert naps == sorted(naps) and len(naps) == 4


def test_the_backoff_doubles_up_to_its_most_however_many_tries():
    """serve tries a file left in the dump again and again, for days if it must."""
    backoff = retry.Backoff(1.0, 60.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 6, 7, 8)] == [1.0, 2.0, 4.0, 32.0, 60.0, 60.0]
    assert backoff.delay(100_000) == 60.0
