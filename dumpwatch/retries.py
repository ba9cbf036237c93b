"""serve's two ways of trying again later, each after a wait that doubles: a file left in the
dump, and sorting paused because the journal or the tree cannot be written."""

from __future__ import annotations

import heapq
import logging
import os
import sqlite3
import time
from pathlib import Path

from dumpwatch.dumplock import DumpLock
from dumpwatch.outcomes import Handled, Outcome
from dumpwatch.reasons import os_reason
from dumpwatch.retry import Backoff

log = logging.getLogger(__name__)

RETRY_BACKOFF = Backoff(1.0, 60.0)  # seconds before a file left in place is tried again
PAUSE_BACKOFF = Backoff(10.0, 60.0)  # seconds sorting pauses when the journal cannot be written
LEFT_SHOWN, LEFT_REASON_MAX = 3, 300  # reasons for files left in the dump that the lock holds, and their length


class Retries:
    """Files left in the dump, each tried again after a wait that doubles (RETRY_BACKOFF);
    why they were left goes to the lock, for `dumpwatch status`."""

    def __init__(self, lock: DumpLock) -> None:
        self.lock = lock
        self.due: list[tuple[float, str]] = []  # (due, path) heap of files left to try again
        self.tries: dict[str, int] = {}  # path -> times left in a row
        self.left: dict[str, tuple[str, int]] = {}  # path -> (why it was left, times in a row), for status

    def record(self, outcomes: list[Handled], moment: float) -> None:
        """Files left in the dump are tried again later; the others are no longer waiting."""
        noted = False
        for outcome in outcomes:
            if outcome.outcome == Outcome.LEFT:
                self._left_again(outcome.source, outcome.detail, moment)
                noted = True
            else:
                self.tries.pop(outcome.source, None)
                noted |= self.left.pop(outcome.source, None) is not None
        if noted:
            self._note_left()

    def _left_again(self, path: str, reason: str, moment: float) -> None:
        self.tries[path] = self.tries.get(path, 0) + 1
        heapq.heappush(self.due, (moment + RETRY_BACKOFF.delay(self.tries[path]), path))
        before, tries = self.left.get(path, ("", 0))
        self.left[path] = (reason, tries + 1 if before == reason else 1)

    def due_now(self, moment: float) -> list[str]:
        """The files due to be tried again by moment, soonest first."""
        paths = []
        while self.due and self.due[0][0] <= moment:
            paths.append(heapq.heappop(self.due)[1])
        return paths

    def next_due(self) -> float | None:
        return self.due[0][0] if self.due else None

    def waiting(self) -> set[str]:
        return {path for _, path in self.due}

    def forget_taken(self) -> None:
        """Files taken from the dump by someone else are no longer waiting."""
        if self.left:
            self.left = {path: why for path, why in self.left.items() if os.path.lexists(path)}
            self._note_left()

    def at_once(self) -> None:
        """After a pause: files left for want of space may go now, all are tried at once."""
        self.due.clear()
        self.tries.clear()

    def _note_left(self) -> None:
        """Why files wait in the dump, for `dumpwatch status`: a few reasons, most files first."""
        by_reason: dict[str, list[int]] = {}
        for reason, tries in self.left.values():
            files_tries = by_reason.setdefault(reason, [0, 0])
            files_tries[0] += 1
            files_tries[1] = max(files_tries[1], tries)
        ranked = sorted(by_reason.items(), key=lambda item: (-item[1][0], item[0]))[:LEFT_SHOWN]
        self.lock.note_left([{"reason": reason[:LEFT_REASON_MAX], "files": files, "tries": tries}
                             for reason, (files, tries) in ranked])


class Pause:
    """Sorting paused: the journal (or the tree) cannot be written, most often because the disk
    is full. Exiting would only restart into the same wall, until the supervisor gives up: wait
    instead, and try again. The files wait in the dump; nothing is lost."""

    def __init__(self, lock: DumpLock, journal_path: Path | None) -> None:
        self.lock = lock
        self.journal_path = journal_path
        self.until = 0.0  # sorting waits until then (0: it is not paused)
        self.pauses = 0  # in a row

    def begin(self, exc: BaseException | str) -> None:
        """Pause for the next wait, and tell `dumpwatch status` why."""
        if isinstance(exc, OSError):
            reason = os_reason(exc)
        elif isinstance(exc, sqlite3.Error):
            reason = f"the journal {self.journal_path} cannot be written: {exc}"
        else:
            reason = str(exc)
        self.pauses += 1
        wait = PAUSE_BACKOFF.delay(self.pauses)
        log.error("sorting paused for %.0f s: %s; the files wait in the dump", wait, reason)
        self.lock.note_paused(reason)
        self.until = time.monotonic() + wait

    def end(self) -> None:
        self.lock.note_paused("")
        self.until, self.pauses = 0.0, 0
