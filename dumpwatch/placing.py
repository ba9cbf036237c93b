"""The placing side of the chain: one batch of prepared files into the tree, step by step.

Batch.run lists the steps in the order they run. Each acts on the plans no earlier step
refused, and refuses a plan by giving it its Verdict; settle() then journals each plan by
what it carries. A kill at any line leaves journal rows under way that recovery settles at
the next start (the crash points named by failpoints.hit are where the kill tests strike).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dumpwatch import failpoints
from dumpwatch.errors import Rejected
from dumpwatch.fsops import AT_FDCWD, copy_file
from dumpwatch.identity import Placed
from dumpwatch.journal import Entry
from dumpwatch.outcomes import PER_FILE, Failed, Handled, Outcome, Prepared
from dumpwatch.prepare import staged_name
from dumpwatch.reasons import not_placed, os_reason
from dumpwatch.retry import retry_transient
from dumpwatch.tree import Decision

if TYPE_CHECKING:
    from dumpwatch.sorter import Sorter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Why a planned file is not placed now: it stays in the dump (LEFT) or vanished (GONE)."""

    outcome: Outcome
    reason: str


@dataclass
class Plan:
    """One file's way into the tree: the tree's decision, its journal rows, and what befell it."""

    item: Prepared
    decision: Decision
    entry: Entry  # its journal row
    renames: list[Entry]  # rows of the echo renames its placing brings about
    verdict: Verdict | None = None  # set by the step that refuses it; None while it goes on
    created: list[tuple[str, ...]] = field(default_factory=list)  # folders made for it
    stuck: str = ""  # in the tree, but its source could not be removed: why

    @property
    def twin(self) -> bool:
        """Its bytes are in the tree already: a duplicate, or this very file (an interrupted move)."""
        return self.decision.outcome == Outcome.DUPLICATE or self.decision.already


class Batch:
    """One batch of prepared files through the placing chain, under the tree lock."""

    def __init__(self, sorter: Sorter, prepared: list[Prepared], failed: list[Failed]):
        self.sorter = sorter
        self.tree, self.job, self.copy = sorter.tree, sorter.job, sorter.copy
        self.prepared = prepared
        self.failed = failed  # those the tree refuses are added: the sorter quarantines or leaves them
        self.plans: list[Plan] = []

    def run(self) -> list[Handled]:
        self.plan()
        if self.sorter.dry_run:
            return [Handled(p.item.source, Outcome(p.decision.outcome), p.entry.dest or "") for p in self.plans]
        assert self.sorter.journal is not None
        self.journal = self.sorter.journal
        self.journal_ahead()
        self.flush_sources()
        self.move()
        self.sync_folders()
        self.release_sources()
        return self.settle()

    def _going(self) -> list[Plan]:
        return [plan for plan in self.plans if plan.verdict is None]

    # -- the steps, in order -------------------------------------------------------------

    def plan(self) -> None:
        """The tree decides each file's place (Tree.decide); a refusal goes to self.failed."""
        root = str(self.sorter.cfg.dir_out)
        for item in self.prepared:
            try:
                decision = self.tree.decide(item.name, item.series_uid, item.sop_uid, self._bytes_of(item),
                                            item.body_size, item.dev, item.ino)
            except Rejected as exc:
                self.failed.append(Failed(item.source, Outcome.QUARANTINED, str(exc), item.sha256, item.sop_uid))
                self.sorter.unstage(item)
                continue
            except OSError as exc:  # its series folder could not be read
                planned = os.path.join(root, *item.name.folders, item.name.stem)
                self.failed.append(Failed(item.source, Outcome.LEFT, not_placed(exc, planned, root), item.sha256,
                                          item.sop_uid, item.series_uid))
                self.sorter.unstage(item)
                continue
            dest = str(self.tree.path(decision.rel))
            folder = decision.folder.rel
            item.facts.folder = "/".join(folder)
            entry = Entry(decision.outcome, item.source, item.sop_uid, item.series_uid, item.sha256, dest,
                          kept=self.copy, out_sha256=None if item.out_sha256 == item.sha256 else item.out_sha256,
                          facts=item.facts, size=item.size)
            renames = [
                Entry(Outcome.RENAMED, str(self.tree.path((*folder, old))), dest=str(self.tree.path((*folder, new))),
                      reason="the series has several echoes")
                for old, new in decision.renames
            ]
            self.plans.append(Plan(item, decision, entry, renames))

    def journal_ahead(self) -> None:
        """Write-ahead: every move and rename is in the journal, under way, before it happens."""
        self.journal.begin([e for p in self.plans for e in (*p.renames, p.entry)])
        failpoints.hit("journal-begun")

    def flush_sources(self) -> None:
        """The data of files about to be renamed into the tree goes to disk first (durability)."""
        unsynced = self.sorter.source_sync.sync([p.item for p in self.plans if not p.item.staged])
        for plan in self.plans:
            if plan.item.source in unsynced:
                plan.verdict = Verdict(Outcome.LEFT, unsynced[plan.item.source])

    def move(self) -> None:
        """Each file into its place, never over another; a file changed since it was read stays."""
        root = str(self.sorter.cfg.dir_out)
        for plan in self.plans:
            item = plan.item
            plan.verdict = source_changed(item) or plan.verdict  # a vanished file is gone, flushed or not
            if plan.verdict is None:
                try:
                    plan.created = self._apply(plan)
                except (OSError, Rejected) as exc:
                    source = None if item.staged else item.source
                    plan.verdict = Verdict(Outcome.LEFT, not_placed(exc, plan.entry.dest, root, source))
            if plan.verdict is not None:
                self._undo(plan)
                continue
            failpoints.hit("placed")

    def sync_folders(self) -> None:
        """Copies must be durable before their sources go: fsync the folders that name them."""
        folders: set[tuple[str, ...]] = set()
        for plan in self._going():
            if plan.item.staged and not self.copy:
                folders.add(plan.decision.folder.rel)
                folders.update(rel[:-1] for rel in plan.created)
        if folders:
            self.tree.sync(folders)

    def release_sources(self) -> None:
        """Remove each placed file's source from the dump; a duplicate's only once its twin is proven there."""
        renamed = {r.source: r.dest for p in self.plans for r in p.renames}  # the echo renames carried out
        for plan in self._going():
            item, decision = plan.item, plan.decision
            if plan.twin:
                self.sorter.unstage(item)  # its copy was not needed
                while plan.entry.dest in renamed:  # its twin got "_01" later in this batch
                    plan.entry.dest = renamed[plan.entry.dest]
                if decision.outcome == Outcome.DUPLICATE and not self.tree.still_holds(decision, plan.entry.dest or ""):
                    # Its twin was not placed after all (in this batch), or a hand removed or
                    # replaced it since it was proven: keep this one in the dump, and look at
                    # the folder afresh when it is tried again.
                    self.tree.forget(decision.folder)
                    plan.verdict = Verdict(Outcome.LEFT, "the identical file it matched is not there any more")
                    continue
            if not self.copy:
                if item.staged or plan.twin:
                    failpoints.hit("unlink-source")
                    problem = remove_source(item, decision)
                    if problem:
                        # In the tree, yet still in the dump (a dump shared with the sticky bit,
                        # a file of another user): say so and go on; a person must remove it.
                        plan.stuck = f"in the tree at {plan.entry.dest}, but it cannot be removed from here: {problem}"
                        log.error("%s: %s", self.job.shown(item.source), plan.stuck, extra=PER_FILE)
                        if plan.twin:  # nothing new happened to it
                            plan.verdict = Verdict(Outcome.LEFT, plan.stuck)
                            continue
                self.sorter.unquarantined(item.source)
            log.info("%s %s -> %s", decision.outcome, self.job.shown(item.source), plan.entry.dest)
        failpoints.hit("sources-removed")

    def settle(self) -> list[Handled]:
        """Journal each plan as it ended: done, left with its reason, or forgotten."""
        handled: list[Handled] = []
        finished: list[Entry] = []
        left: list[Entry] = []
        forget: list[int | None] = []
        stuck: list[Entry] = []
        for plan in self.plans:
            item, verdict = plan.item, plan.verdict
            if plan.stuck:
                stuck.append(Entry(Outcome.LEFT, item.source, item.sop_uid, sha256=item.sha256, reason=plan.stuck))
            if verdict is None:
                finished.append(plan.entry)
                handled.append(Handled(item.source, Outcome(plan.decision.outcome), plan.entry.dest or ""))
                continue
            # A file whose twin is in the tree and only cannot be removed holds no series open.
            handled.append(Handled(item.source, verdict.outcome, verdict.reason, "" if plan.stuck else item.series_uid))
            if verdict.outcome == Outcome.GONE or plan.stuck:
                forget.append(plan.entry.id)  # nothing happened to it, or its stuck row tells
            else:
                plan.entry.reason = verdict.reason
                left.append(plan.entry)
        finished += [e for p in self.plans for e in p.renames]  # those not carried out were forgotten
        self.journal.finish(finished, left)
        self.journal.forget(forget)
        self.journal.record(stuck)
        return handled

    # -- helpers of the steps ------------------------------------------------------------

    def _bytes_of(self, item: Prepared) -> Placed:
        """Where the bytes item would place can be read: its staged copy, or its source as
        long as it is the file the worker read; in a dry run that rewrote the header, only
        their identity (they were never written)."""
        if item.identity is not None:
            return Placed(-1, "", identity=item.identity)
        if item.staged:
            return Placed(self.sorter.staging_fd, item.staged)
        return Placed(AT_FDCWD, item.source, (item.dev, item.ino, item.source_size, item.mtime_ns))

    def _apply(self, plan: Plan) -> list[tuple[str, ...]]:
        """Place one file; if the dump and the tree turn out to be two mounts, as a copy."""
        item = plan.item
        source = (self.sorter.staging_fd, item.staged) if item.staged else (AT_FDCWD, item.source)
        try:
            return retry_transient(self.tree.apply, plan.decision, source)
        except OSError as exc:
            if exc.errno != errno.EXDEV or item.staged:
                raise
        # Two bind mounts of one filesystem share a device number, yet rename between them
        # fails: copy the file into the staging folder (fsynced), and place the copy.
        name = staged_name()
        copy_file(item.source, self.sorter.staging_fd, name, self.sorter.cfg.file_mode, self.sorter.cfg.group)
        item.staged = name
        return retry_transient(self.tree.apply, plan.decision, (self.sorter.staging_fd, name))

    def _undo(self, plan: Plan) -> None:
        """A plan refused before its move: the tree's picture of its folder is forgotten, its
        staged copy removed, and the rows of the echo renames not carried out forgotten."""
        assert plan.verdict is not None
        log.error("%s %s: not placed at %s: %s", plan.verdict.outcome, self.job.shown(plan.item.source),
                  plan.entry.dest, plan.verdict.reason, extra=PER_FILE)
        self.tree.forget(plan.decision.folder)
        self.sorter.unstage(plan.item)
        self.journal.forget([r.id for r in plan.renames if not os.path.lexists(r.dest or "")])
        plan.renames = [r for r in plan.renames if os.path.lexists(r.dest or "")]


def source_changed(item: Prepared) -> Verdict | None:
    """If the source is not the file that was read any more: why it is not placed."""
    try:
        st = os.lstat(item.source)
    except FileNotFoundError:
        return Verdict(Outcome.GONE, "vanished while it was being sorted")
    except OSError as exc:
        return Verdict(Outcome.LEFT, os_reason(exc))
    if (st.st_ino, st.st_size, st.st_mtime_ns) != (item.ino, item.source_size, item.mtime_ns):
        return Verdict(Outcome.LEFT, "changed while it was being sorted: it will be read again")
    return None


def remove_source(item: Prepared, decision: Decision) -> str:
    """Remove a source that is now in the tree (or was a duplicate of a file there); returns
    why it could not be removed, or ""."""
    try:
        if decision.already and os.lstat(item.source).st_nlink < 2:
            return ""  # the tree's own file, reached by another path: nothing to remove
        os.unlink(item.source)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return os_reason(exc)
    return ""
