"""`dumpwatch sort-once`: sort every file below a folder (an old dump, an archive), then report."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from dumpwatch.actions import queue_after
from dumpwatch.completion import Completion
from dumpwatch.config import Config
from dumpwatch.dumplock import LOCK_NAME, read_lock
from dumpwatch.errors import ConfigError
from dumpwatch.outcomes import Handled, Outcome
from dumpwatch.sorter import Sorter
from dumpwatch.text import printable
from dumpwatch.workers import Workers

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_ALL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_SHOWN = 20  # distinct reasons listed in the summary
_REASONS_KEPT = 1000  # distinct reasons counted; files with others are counted without theirs


def folder_id(path: Path | str | None) -> tuple[int, int] | None:
    """(device, inode) of a folder: the same folder reached by a symlink or a bind mount is
    the same folder."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino)


def inside(path: Path, folder: Path) -> bool:
    """True if path is folder or below it, however either is reached."""
    target = folder_id(folder)
    if target is None:
        return False
    return any(folder_id(p) == target for p in (path, *path.parents))


def walk(root: Path, skip: set, unreadable: list[str], quarantine: tuple[int, int] | None = None,
         served: list[str] | None = None, ordered: bool = True) -> Iterator[str]:
    """Every entry below root that is not a folder, in name order (or, if not ordered, as
    listed: for counting). Symlinks are listed as entries and never followed; folders in
    `skip` (by (device, inode), or by absolute path for those made while walking) are not
    entered; in the quarantine folder, the reason files beside the files are not entries of
    their own. A dump that a running serve watches is left to it (storescp may be writing
    there) and named in `served`. Only the names of one folder are held at a time: an old
    dump of 100,000 files in one folder costs megabytes, not one object per file."""
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        reasons_here = quarantine is not None and folder_id(folder) == quarantine
        if os.path.lexists(os.path.join(folder, LOCK_NAME)):
            holder = read_lock(Path(folder))
            if holder is not None:
                log.warning("skipping %s: dumpwatch serve sorts it (%s)", folder, holder.describe())
                if served is not None:
                    served.append(folder)
                continue
        folders, names = [], []
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if (st.st_dev, st.st_ino) not in skip and os.path.abspath(entry.path) not in skip:
                            folders.append(entry.path)
                    elif entry.name == LOCK_NAME or (reasons_here and entry.name.endswith(".reason.txt")):
                        continue  # serve's lock on a dump (no serve holds it now), or a reason file
                    elif ordered:
                        names.append(entry.name)
                    else:
                        yield entry.path
        except OSError as exc:
            log.error("cannot list %s: %s", folder, exc.strerror)
            unreadable.append(f"{folder}: {exc.strerror}")
            continue
        names.sort()
        for name in names:
            yield os.path.join(folder, name)
        folders.sort()
        stack.extend(reversed(folders))


def probe_writable(folder: Path, what: str) -> None:
    """Raise ConfigError unless dumpwatch could write in folder, or make it if it is missing:
    a folder is made where it would be, and removed at once. No permission bit tells it all
    (root passes them, but not a read-only mount, nor /proc or /sys)."""
    path = Path(os.path.abspath(folder))
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be made: {existing} is not a folder")
    verb = "written in" if existing == path else "made"
    try:
        probe = tempfile.mkdtemp(prefix=".dumpwatch-dry-run-", dir=existing)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be {verb}: {exc.strerror or exc}"
                          + ("" if existing == path else f" (in {existing})")) from None
    os.rmdir(probe)


def check_dry_run(cfg: Config) -> None:
    """What a dry run changes nothing to learn: that the real run could make the sorted tree,
    its state folder and the journal. Raises ConfigError naming what it could not."""
    assert cfg.dir_out is not None and cfg.state_dir is not None and cfg.journal_path is not None
    probe_writable(cfg.dir_out, "the sorted tree")
    if os.path.isdir(cfg.state_dir):
        probe_writable(cfg.state_dir, "the state folder")
    if not str(os.path.abspath(cfg.journal_path)).startswith(os.path.abspath(cfg.state_dir) + os.sep):
        probe_writable(cfg.journal_path.parent, "the journal's folder")


@dataclass
class Summary:
    """Counts of outcomes, and of the reasons of files not sorted, for the report at the end."""

    counts: Counter = field(default_factory=Counter)
    problems: list[Handled] = field(default_factory=list)  # the first few files not sorted
    reasons: Counter = field(default_factory=Counter)  # (outcome, reason) -> files
    examples: dict[tuple[str, str], str] = field(default_factory=dict)  # (outcome, reason) -> its first file
    unreadable: list[str] = field(default_factory=list)
    served: list[str] = field(default_factory=list)  # dumps a running serve sorts: skipped
    notes: list[str] = field(default_factory=list)  # what a dry run found a real run would meet
    elapsed: float = 0.0
    stopped: str = ""  # why the run ended before every file was handled
    completions: list[Completion] = field(default_factory=list)  # series and studies it completed
    left_series: set[str] = field(default_factory=set)  # series of the files left in place

    def add(self, outcomes: list[Handled]) -> None:
        for outcome in outcomes:
            self.counts[outcome.outcome] += 1
            if outcome.outcome == Outcome.LEFT and outcome.series_uid:
                self.left_series.add(outcome.series_uid)
            if outcome.outcome not in (Outcome.QUARANTINED, Outcome.LEFT):
                continue
            if len(self.problems) < _SHOWN:
                self.problems.append(outcome)
            key = (outcome.outcome, outcome.detail)
            if key in self.reasons or len(self.reasons) < _REASONS_KEPT:
                self.reasons[key] += 1
                self.examples.setdefault(key, outcome.source)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return EXIT_INTERRUPTED if self.stopped == "interrupted" else EXIT_ERROR
        if self.counts[Outcome.QUARANTINED] or self.counts[Outcome.LEFT] or self.unreadable or self.served:
            return EXIT_NOT_ALL
        return EXIT_OK

    def _reasons(self, cfg: Config, dry_run: bool) -> list[str]:
        """One line for each distinct reason a file was not sorted, with how many files had
        it (a tree no one may write in gives the same reason for every file)."""
        lines = []
        shown: Counter = Counter()
        for (outcome, reason), count in self.reasons.most_common(_SHOWN):
            example = printable(self.examples[outcome, reason])
            if count == 1:
                lines.append(f"    {outcome}: {example}: {printable(reason)}")
            else:
                lines.append(f"    {outcome} ({count} files, e.g. {example}): {printable(reason)}")
            shown[outcome] += count
        kept = (Outcome.QUARANTINED, Outcome.LEFT)
        hidden = {o: self.counts[o] - shown[o] for o in kept if self.counts[o] > shown[o]}
        if hidden:
            files = sum(hidden.values())
            where = []
            if dry_run:
                where.append("each is listed above")
            else:
                if Outcome.QUARANTINED in hidden:
                    where.append(f"the .reason.txt beside each quarantined file in {cfg.quarantine_dir}")
                if Outcome.LEFT in hidden:
                    where.append("`dumpwatch where NAME` for each file left in place")
            lines.append(f"    ... and {files} more file{'s' if files != 1 else ''} with other reasons: "
                         + " or ".join(where))
        return lines

    def _completed(self) -> list[str]:
        """The series and studies it completed; each series that misses images by name."""
        series = [c for c in self.completions if c.kind == "series"]
        if not series:
            return []
        studies = len(self.completions) - len(series)
        lacking = [c for c in series if c.verdict.startswith("missing")]
        lines = [f"  {'complete':<12}{len(series):>7}  series in {studies} stud{'ies' if studies != 1 else 'y'}"
                 + (f", {len(lacking)} missing images (dumpwatch report --incomplete)" if lacking else "")]
        for item in lacking[:_SHOWN]:
            lines.append(f"    incomplete: {printable(item.folder)}: {item.verdict}")
        return lines

    def render(self, cfg: Config, dry_run: bool) -> str:
        rate = self.total / self.elapsed if self.elapsed > 0 else 0.0
        verb = "would be" if dry_run else "were"
        lines = [f"{self.total} files in {self.elapsed:.1f} s ({rate:,.0f} files/s)"
                 + (" - dry run, nothing changed" if dry_run else "")]
        rows = [
            (Outcome.SORTED, f"into {cfg.dir_out}"),
            (Outcome.DUPLICATE, "identical to a sorted file" + ("" if dry_run else ", not added again")),
            (Outcome.QUARANTINED, f"in {cfg.quarantine_dir}, each with a .reason.txt"),
            (Outcome.LEFT, "in place, to try again"),
        ]
        for key, note in rows:
            lines.append(f"  {key:<12}{self.counts[key]:>7}  {note if self.counts[key] else ''}".rstrip())
        if self.counts[Outcome.GONE]:
            lines.append(f"  {'vanished':<12}{self.counts['gone']:>7}  {verb} removed by something else while sorting")
        lines += self._reasons(cfg, dry_run)
        for folder in self.unreadable:
            lines.append(f"  cannot list {printable(folder)}")
        for folder in self.served:
            lines.append(f"  skipped {printable(folder)}: dumpwatch serve is watching it and sorts it itself")
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines += self._completed()
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}; the files not handled are still in place: "
                         "run it again to finish")
        return "\n".join(lines)


COUNT_EVERY = 10.0  # seconds between counts of the files placed into their series


def sort_dir(
    root: Path,
    cfg: Config,
    *,
    copy: bool = False,
    dry_run: bool = False,
    on_outcome: Callable[[Handled], None] | None = None,
    progress: Callable[[int], None] | None = None,
    count_first: Callable[[int], None] | None = None,
    hooks: bool = True,
) -> Summary:
    """Sort every file below root into cfg.dir_out. Never follows a symlink. A dry run first
    checks that a real one could write the tree (ConfigError if not)."""
    if dry_run:
        check_dry_run(cfg)
    summary = Summary()
    started = time.perf_counter()
    with Sorter(cfg, copy=copy, dry_run=dry_run) as sorter:
        quarantine = folder_id(cfg.quarantine_dir)
        skip: set = {i for i in (folder_id(cfg.dir_out), quarantine) if i is not None}
        skip |= {os.path.abspath(p) for p in (cfg.dir_out, cfg.quarantine_dir) if p is not None}
        sorter.recover()
        if sorter.journal is not None:
            sorter.journal.hold_completions()  # a serve into this tree completes nothing meanwhile
            if hooks and cfg.hooks:
                # Queued with the completions, for serve to run (no notices: a backfill is not news).
                sorter.journal.after_completion = functools.partial(queue_after, cfg, notices=False)
        total = sum(1 for _ in walk(root, skip, [], quarantine, ordered=False))
        if count_first:
            count_first(total)
        workers = cfg.worker_count if total >= 64 else 1
        size = max(1, min(64, total // (workers * 4) or 1))
        # Always in worker processes, even one: a file that kills its reader (memory, a crash
        # in a C library) is then quarantined, where it would end sort-once at every run.
        with Workers(sorter.job, workers, always_pool=True, state=None if dry_run else cfg.state_dir) as pool:
            try:
                listing = walk(root, skip, summary.unreadable, quarantine, summary.served)
                counted = time.monotonic()
                for results in pool.run(chunked(listing, size)):
                    outcomes = sorter.handle(results)  # a whole batch, or none of it
                    if sorter.journal is not None and time.monotonic() - counted > COUNT_EVERY:
                        sorter.journal.count()  # into their series, many batches at once
                        counted = time.monotonic()
                    summary.add(outcomes)
                    if on_outcome:
                        for outcome in outcomes:
                            on_outcome(outcome)
                    if progress:
                        progress(len(outcomes))
            except KeyboardInterrupt:
                summary.stopped = "interrupted"
            except BrokenProcessPool:  # a dead worker is replaced: this is a pool that cannot start
                summary.stopped = "worker processes die as they start"
                log.error("worker processes die as they start; the files not handled are still in place")
            except sqlite3.Error as exc:  # a full disk, say: no file moves without its journal row
                summary.stopped = f"the journal cannot be written ({exc})"
                log.error("the journal %s cannot be written: %s", cfg.journal_path, exc)
        sorter.tidy()  # the workers are gone now: so are the copies of a run killed before
        if not summary.stopped and sorter.journal is not None and cfg.dir_dump and read_lock(cfg.dir_dump):
            summary.notes.append("dumpwatch serve runs: it completes the series sorted here once they are idle")
        elif not summary.stopped and sorter.journal is not None:
            try:
                # What it sorted is all there is: complete now.
                held = summary.left_series  # a file left holds its series
                summary.completions = sorter.journal.complete_counted(cfg.series_idle, cfg.study_idle, held)
                if hooks and cfg.hooks and summary.completions:
                    summary.notes.append("the hooks of the series and studies completed here are queued: dumpwatch "
                                         "serve runs them (sort-once --no-hooks queues none)")
            except sqlite3.Error as exc:
                summary.notes.append(f"the series sorted could not be marked complete: {exc}")
    if dry_run and summary.counts[Outcome.QUARANTINED] and cfg.quarantine_dir is not None:
        try:
            probe_writable(cfg.quarantine_dir, "the quarantine")
        except ConfigError as exc:
            summary.notes.append(f"{exc}: a real run would leave the files it would quarantine in place")
    summary.elapsed = time.perf_counter() - started
    return summary


def chunked(items: Iterable[str], size: int) -> Iterable[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
