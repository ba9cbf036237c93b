"""When to try again: one doubling backoff, and tenacity's policy for OS errors that heal in
seconds (a busy NFS server, a lock held a moment)."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from dumpwatch.reasons import os_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """A wait that doubles with each try, from first up to most seconds."""

    first: float
    most: float

    def delay(self, attempt: int) -> float:
        """The wait before try attempt + 1 (attempt 1: first). The doubling stops at 2**32:
        a file left for days is tried thousands of times, and 2**1024 is too large a float."""
        return min(self.first * 2 ** min(max(0, attempt - 1), 32), self.most)


TRANSIENT_BACKOFF = Backoff(0.2, 5.0)  # a transient OS error: five tries within about 3 s
_TRANSIENT = {errno.EAGAIN, errno.EBUSY, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOLCK}


def is_transient(exc: BaseException) -> bool:
    """OS errors worth another try; a missing permission or a full disk will not heal in seconds."""
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT


def _before_sleep(state: RetryCallState) -> None:
    # The error's reason only: an OSError's text names the file, and a file's name may hold
    # what anonymising removes.
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("retrying in %.1f s after: %s", wait, os_reason(exc) if isinstance(exc, OSError) else exc)


retrying = Retrying(
    retry=retry_if_exception(is_transient),
    stop=stop_after_attempt(5),
    wait=lambda state: TRANSIENT_BACKOFF.delay(state.attempt_number),
    before_sleep=_before_sleep,
    reraise=True,
)


def retry_transient(call, *args):
    """call(*args); if it fails with a transient OS error, again under the retry policy.

    The first try goes without tenacity's bookkeeping: it is on every file's path.
    """
    try:
        return call(*args)
    except OSError as exc:
        if not is_transient(exc):
            raise
        log.warning("retrying after: %s", os_reason(exc))
        return retrying(call, *args)
