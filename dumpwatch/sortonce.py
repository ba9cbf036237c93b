"""`dumpwatch sort-once`: sort every file below a folder (an old dump, an archive), then report."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from dumpwatch.config import Config
from dumpwatch.journal import printable
from dumpwatch.pipeline import Outcome, Sorter, chunked
from dumpwatch.workers import Workers

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_ALL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_SHOWN = 20  # problems listed one by one in the summary


def walk(root: Path, skip: set[str], unreadable: list[str]) -> Iterator[str]:
    """Every entry below root that is not a folder, in name order. Symlinks are listed as
    entries and never followed; folders in `skip` (absolute paths) are not entered."""
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            log.error("cannot list %s: %s", folder, exc.strerror)
            unreadable.append(f"{folder}: {exc.strerror}")
            continue
        folders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if os.path.abspath(entry.path) not in skip:
                    folders.append(entry.path)
            else:
                yield entry.path
        stack.extend(reversed(folders))


@dataclass
class Summary:
    """Counts of outcomes and the first few problems, for the report at the end."""

    counts: Counter = field(default_factory=Counter)
    problems: list[Outcome] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    stopped: str = ""  # why the run ended before every file was handled

    def add(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self.counts[outcome.outcome] += 1
            if outcome.outcome in ("quarantined", "left") and len(self.problems) < _SHOWN:
                self.problems.append(outcome)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return EXIT_INTERRUPTED if self.stopped == "interrupted" else EXIT_ERROR
        if self.counts["quarantined"] or self.counts["left"] or self.unreadable:
            return EXIT_NOT_ALL
        return EXIT_OK

    def render(self, cfg: Config, dry_run: bool) -> str:
        rate = self.total / self.elapsed if self.elapsed > 0 else 0.0
        verb = "would be" if dry_run else "were"
        lines = [f"{self.total} files in {self.elapsed:.1f} s ({rate:,.0f} files/s)"
                 + (" - dry run, nothing changed" if dry_run else "")]
        rows = [
            ("sorted", f"into {cfg.dir_out}"),
            ("duplicate", "identical to a sorted file" + ("" if dry_run else ", not added again")),
            ("quarantined", f"in {cfg.quarantine_dir}, each with a .reason.txt"),
            ("left", "in place, to try again"),
        ]
        for key, note in rows:
            lines.append(f"  {key:<12}{self.counts[key]:>7}  {note if self.counts[key] else ''}".rstrip())
        if self.counts["gone"]:
            lines.append(f"  {'vanished':<12}{self.counts['gone']:>7}  {verb} removed by something else while sorting")
        for problem in self.problems:
            lines.append(f"    {problem.outcome}: {printable(problem.source)}: {printable(problem.detail)}")
        hidden = self.counts["quarantined"] + self.counts["left"] - len(self.problems)
        if hidden > 0:
            lines.append(f"    ... and {hidden} more: see `dumpwatch where NAME` or the .reason.txt files")
        for folder in self.unreadable:
            lines.append(f"  cannot list {printable(folder)}")
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}; the files not handled are still in place: "
                         "run it again to finish")
        return "\n".join(lines)


def sort_dir(
    root: Path,
    cfg: Config,
    *,
    copy: bool = False,
    dry_run: bool = False,
    on_outcome: Callable[[Outcome], None] | None = None,
    progress: Callable[[int], None] | None = None,
    count_first: Callable[[int], None] | None = None,
) -> Summary:
    """Sort every file below root into cfg.dir_out. Never follows a symlink."""
    summary = Summary()
    started = time.perf_counter()
    skip = {os.path.abspath(p) for p in (cfg.dir_out, cfg.quarantine_dir) if p is not None}
    with Sorter(cfg, copy=copy, dry_run=dry_run) as sorter:
        sorter.recover()
        total = sum(1 for _ in walk(root, skip, []))
        if count_first:
            count_first(total)
        workers = cfg.worker_count if total >= 64 else 1
        size = max(1, min(64, total // (workers * 4) or 1))
        with Workers(sorter.job, workers) as pool:
            try:
                for results in pool.run(chunked(walk(root, skip, summary.unreadable), size)):
                    outcomes = sorter.handle(results)  # a whole batch, or none of it
                    summary.add(outcomes)
                    if on_outcome:
                        for outcome in outcomes:
                            on_outcome(outcome)
                    if progress:
                        progress(len(outcomes))
            except KeyboardInterrupt:
                summary.stopped = "interrupted"
            except BrokenProcessPool:
                summary.stopped = "a worker process died"
                log.error("a worker process died; the files it had are still in place")
    summary.elapsed = time.perf_counter() - started
    return summary
