"""The sorter: the placing side's session. It builds what a run needs (the tree, the journal,
the anonymiser, the worker's Job), hands each batch of prepared files to the placing chain
(placing.Batch), rejected ones to the quarantine, and settles what a kill left (recovery)."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from dumpwatch.anonymise import Anonymiser
from dumpwatch.config import Config
from dumpwatch.durability import SourceSync, signals_deferred
from dumpwatch.facts import FACT_TAGS
from dumpwatch.fsops import remove_if_there
from dumpwatch.journal import Entry, Journal
from dumpwatch.keys import load_key
from dumpwatch.naming import naming_tags
from dumpwatch.outcomes import Failed, Handled, Outcome, Prepared
from dumpwatch.placing import Batch
from dumpwatch.prepare import Job
from dumpwatch.quarantine import Quarantine
from dumpwatch.recovery import check_journal, clean_staging, settle_interrupted
from dumpwatch.state import StateFolder
from dumpwatch.tree import Tree

log = logging.getLogger(__name__)


class Sorter:
    """Places prepared files, quarantines rejected ones, journals every outcome.

    Each batch runs under the tree lock: journal rows are written as under way, files move,
    folders are fsynced where a copy replaces a source, sources go, rows are marked done
    (placing.Batch.run lists the steps). A kill at any point leaves rows under way that
    recover() settles at the next start.
    """

    def __init__(self, cfg: Config, *, copy: bool = False, dry_run: bool = False, receiving: bool = False):
        """receiving: serve, sorting what storescp received: allowed_senders applies (sort-once
        sorts what a person hands it: exports and copies carry no calling AE title)."""
        if cfg.dir_out is None:
            raise ValueError("dir_out is not set")
        self.cfg, self.copy, self.dry_run = cfg, copy, dry_run
        state = cfg.state_dir
        assert state is not None
        # Proven dumpwatch's own (not a symlink, not another user's) before anything in it is
        # used, and every name in it reached through its fd from then on: staged copies are
        # cleaned up there. The journal and staged copies name patients' files: the group may
        # read, no one else.
        self.state = StateFolder(state, cfg.dir_mode, cfg.group, create=not dry_run)
        self.tree = Tree(cfg.dir_out, cfg.extension, cfg.dir_mode, cfg.group, cfg.template,
                         lock_path=self.state.file("tree.lock", "tree lock"), dry_run=dry_run)
        self.journal: Journal | None = None
        self.staging = state / "tmp"
        self.staging_fd = -1
        staging_id = None
        self.source_sync = SourceSync()
        if not dry_run:
            self.staging_fd = self.state.folder("tmp", "staging folder")
            staging_id = os.fstat(self.staging_fd).st_dev, os.fstat(self.staging_fd).st_ino
        anonymiser = None
        if cfg.profile is not None:
            key = _anonymisation_key(cfg, dry_run, self.state)
            anonymiser = Anonymiser(cfg.profile, key, cfg.subjects, cfg.anon_burned_in == "allow")
        if not dry_run:
            journal_path = cfg.journal_path
            assert journal_path is not None
            if self.state.holds(journal_path):
                self.state.check(journal_path.name, "journal")
            self.journal = Journal(journal_path, key=anonymiser.key if anonymiser else None,
                                   dir_fd=self.state.fd if self.state.holds(journal_path) else None)
        self.job = Job(
            template=cfg.template,
            wanted=None if (cfg.anon_fields or anonymiser) else naming_tags(cfg.template) | FACT_TAGS,
            reserved=_reserved_names(cfg),
            anon_fields=cfg.anon_fields,
            anonymiser=anonymiser,
            file_mode=cfg.file_mode,
            gid=cfg.group,
            staging=None if dry_run else str(self.staging),
            out_device=self.tree.device,
            copy=copy,
            dry_run=dry_run,
            incomplete_timeout=cfg.incomplete_timeout,
            staging_id=staging_id,
            senders=frozenset(cfg.allowed_senders) if cfg.allowed_senders and receiving else None,
        )
        self.quarantine = Quarantine(cfg, self.journal, self.job, copy, dry_run)

    def close(self) -> None:
        self.tree.close()
        self.source_sync.close()
        if self.staging_fd >= 0:
            os.close(self.staging_fd)
            self.staging_fd = -1
        if self.journal is not None:
            try:
                self.journal.count()  # what was placed since the last count, into its series
            except sqlite3.Error as exc:
                log.warning("the files placed last are not counted into their series yet: %s", exc)
            self.journal.close()
            self.journal = None
        self.state.close()

    def __enter__(self) -> Sorter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batches -------------------------------------------------------------------------

    def handle(self, results: Iterable[Prepared | Failed]) -> list[Handled]:
        """Place, quarantine or leave each prepared file; journal each outcome.

        Ctrl-C and SIGTERM wait for the batch to end: a stop never needs recovery.
        """
        with signals_deferred():
            return self._handle(results)

    def _handle(self, results: Iterable[Prepared | Failed]) -> list[Handled]:
        prepared: list[Prepared] = []
        failed: list[Failed] = []
        for result in results:
            if isinstance(result, Prepared):
                prepared.append(result)
            else:
                failed.append(result)
        handled: list[Handled] = []
        with self.tree.locked():
            if prepared:
                handled += Batch(self, prepared, failed).run()  # adds those the tree refuses to failed
            left = []
            for item in failed:
                if item.action == Outcome.QUARANTINED:
                    handled.append(self.quarantine.put(item))
                elif item.action == Outcome.LEFT:
                    left.append(Entry(Outcome.LEFT, item.source, item.sop_uid, sha256=item.sha256, reason=item.reason))
                    handled.append(Handled(item.source, Outcome.LEFT, item.reason, item.series_uid))
                    log.warning("left %s in place: %s", self.job.shown(item.source), item.reason)
                else:
                    handled.append(Handled(item.source, Outcome.GONE, item.reason))
                    log.info("%s %s", self.job.shown(item.source), item.reason)
            if left and self.journal is not None:
                self.journal.record(left)
            self.tree.trim()
        return handled

    def unstage(self, item: Prepared) -> None:
        """Remove item's staged copy, if it has one."""
        if item.staged and self.staging_fd >= 0:
            try:
                os.unlink(item.staged, dir_fd=self.staging_fd)
            except FileNotFoundError:
                pass
            item.staged = None

    def unquarantined(self, source: str) -> None:
        """source, sorted out of the quarantine: its reason file is moot."""
        if self.quarantine.holds(source):
            remove_if_there(source + ".reason.txt")

    def discard(self, results: Iterable[Prepared | Failed]) -> None:
        """Results that will not be placed now (sorting paused): their files wait in the dump."""
        for result in results:
            if isinstance(result, Prepared):
                self.unstage(result)

    def watch_device(self, folder: Path | str) -> None:
        """Open the sync fd of folder's filesystem now (serve: the dump), so that syncfs
        reports every failed writeback from this moment on."""
        self.source_sync.watch(folder)

    # -- after a kill --------------------------------------------------------------------

    def recover(self) -> int:
        """Settle the moves a killed dumpwatch left under way; remove its staged copies.

        Returns how many journal rows it settled.
        """
        if self.journal is None:
            return 0
        with self.tree.locked():  # every live writer finishes its rows before it lets go
            settled = settle_interrupted(self.journal)
            clean_staging(self.staging_fd)
            changed = self.job.anonymiser is not None or bool(self.job.anon_fields)
            check_journal(self.journal, str(self.cfg.dir_out), self.cfg.extension, self.job.reserved, changed)
        return settled

    def restart(self) -> int:
        """After a batch failed half-way (the journal could not be written): forget what was
        known of the tree, and settle the rows left under way, as at a start."""
        self.tree.forget()
        return self.recover()

    def tidy(self) -> None:
        """Remove staged copies whose writer has died: a killed run's workers may still have
        been exiting when the next run started (serve: at every sweep; sort-once: at the end)."""
        if self.staging_fd >= 0:
            clean_staging(self.staging_fd)


def _anonymisation_key(cfg: Config, dry_run: bool, state: StateFolder) -> bytes:
    """The site's secret; a dry run never makes one (it changes nothing), so it borrows a
    passing key if there is none yet: its new UIDs and pseudonyms are then not the real ones."""
    path = cfg.anon_key_path
    assert path is not None
    if dry_run and not os.path.lexists(path):
        log.warning("no anonymisation key at %s yet: this dry run shows pseudonyms of a passing key", path)
        return os.urandom(32)
    if state.holds(path) and state.fd >= 0:  # the default place: through the proven folder
        state.check(path.name, "anonymisation key")
        return load_key(path, dir_fd=state.fd)
    return load_key(path)


def _reserved_names(cfg: Config) -> frozenset[str]:
    """Top-level names below dir_out that hold other things (a DcmServer-style nested dump)."""
    names = set()
    assert cfg.dir_out is not None
    out = os.path.abspath(cfg.dir_out)
    for other in (cfg.dir_dump, cfg.quarantine_dir):
        if other is not None:
            rel = os.path.relpath(os.path.abspath(other), out)
            if not rel.startswith(".."):
                names.add(rel.split(os.sep)[0])
    return frozenset(names)
