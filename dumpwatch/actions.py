"""After the scan: what serve does once a series or study is complete. It runs the site's hooks
(hooks.py) and sends notices (notify.py), from queues in the journal.

A hook run and a study's notice are queued in the transaction that records the completion
(queue, called by the journal): a kill -9 never loses one, nor queues one twice. A thread of
serve's own (Actions) takes them from there, with a journal connection of its own:

- hooks run at most hook_workers at once, on threads whose CPU and I/O priority are the
  lowest, so that receiving and sorting come first; a run past hook_timeout is killed with
  its process group; a failed run is tried again hook_retries times (tenacity);
- each run is journaled as it starts (its pid and that process's start time) and as it ends
  (exit status, duration, its last lines of output). A run a killed serve left unfinished
  runs again once at the next start, after what is left of it is killed; a run that ended
  is never run again;
- notices are sent one at a time, each tried again later while it fails; quarantined files
  are told of at most once per notify_interval; health is checked every health_interval,
  as `status` decides it, and a change is told of once it is seen twice in a row.

Nothing here can slow or stop sorting: the thread only waits, and a mistake in it is logged.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import tenacity

from dumpwatch import completeness, completion, hooks, notify
from dumpwatch.completion import Completion
from dumpwatch.config import Config
from dumpwatch.dumplock import LockInfo
from dumpwatch.journal import transaction

log = logging.getLogger(__name__)

WAITING, RUNNING, OK, FAILED, SKIPPED, INTERRUPTED = "waiting", "running", "ok", "failed", "skipped", "interrupted"
NOTICE_TRIES = 12  # attempts at a notice before it is given up (the waits double up to an hour: ~8 hours)
NOTICE_WAIT = 30.0  # seconds before a notice is tried again (notify_interval if shorter), doubling
TICK = 1.0  # seconds between looks at the queues when nothing wakes the thread
VERDICTS = {completeness.WHOLE: "whole", completeness.INCOMPLETE: "incomplete",
            completeness.NO_EXPECTATION: "unknown"}


def queue_after(cfg: Config, db: sqlite3.Connection, done: list[Completion], moment: float, hooks_too: bool = True,
                notices: bool = True) -> None:
    """Queue the hook runs and notices these completions call for, in the caller's transaction.
    A fault with one completion (a bug, an odd row) is logged and queues nothing for it: it
    must never fail the transaction that records the completions, which serve would retry."""
    for item in done:
        db.execute("SAVEPOINT queue_after")
        try:
            _queue(cfg, db, item, moment, hooks_too, notices)
        except sqlite3.Error:
            raise  # the journal itself: the caller's transaction fails, and it pauses or retries
        except Exception:  # noqa: BLE001
            db.execute("ROLLBACK TO queue_after")
            log.exception("nothing queued after the completion of %s %s", item.kind, item.folder)
        db.execute("RELEASE queue_after")


def _queue(cfg: Config, db: sqlite3.Connection, item: Completion, moment: float, hooks_too: bool,
           notices: bool) -> None:
    template = cfg.on_series_complete if item.kind == "series" else cfg.on_study_complete
    if hooks_too and template is not None:
        hook = hooks.SERIES if item.kind == "series" else hooks.STUDY
        study_id = item.id
        if item.kind == "series":
            study_id = db.execute("SELECT study_id FROM series WHERE id = ?", (item.id,)).fetchone()[0]
        state, reason = _decide(cfg, db, item, hook)
        column = "series_id" if item.kind == "series" else "study_id"
        db.execute(f"UPDATE hook_runs SET state = ?, reason = ?, ended = ? WHERE hook = ? AND {column} = ?"
                   " AND state = 'waiting'", (SKIPPED, "a later completion of it queued its own run", moment,
                                              hook, item.id))
        db.execute("INSERT INTO hook_runs (completion_id, hook, series_id, study_id, state, reason, queued)"
                   " VALUES (?,?,?,?,?,?,?)", (item.row, hook, item.id if item.kind == "series" else None,
                                               study_id, state, reason, moment))
        if state == SKIPPED:
            log.info("%s not run for %s: %s", hook, item.folder, reason)
    if notices and item.kind == "study" and "study_complete" in cfg.notify_on and cfg.channels:
        subject, body = notify.study(db, item.id, item.again, cfg.notify_identifiers)
        add_notice(db, cfg, moment, subject, body)


def _decide(cfg: Config, db: sqlite3.Connection, item: Completion, hook: str) -> tuple[str, str | None]:
    """(WAITING, None), or (SKIPPED, why)."""
    if cfg.hook_when == "whole":
        if item.kind == "series" and item.whole == completeness.INCOMPLETE:
            return SKIPPED, f"not whole: {item.verdict} (hook_when = whole)"
        if item.kind == "study":
            lacking = [(row["folder"] or "").rsplit("/", 1)[-1] for row in db.execute(
                "SELECT * FROM series WHERE study_id = ? AND files > 0 ORDER BY first, id", (item.id,))
                if completion.verdict_of(row).verdict == completeness.INCOMPLETE]
            if lacking:
                shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
                return SKIPPED, f"not whole: {len(lacking)} series miss images ({shown}) (hook_when = whole)"
    if item.again and not cfg.hook_rerun:
        column = "series_id" if item.kind == "series" else "study_id"
        ran = db.execute(f"SELECT 1 FROM hook_runs WHERE hook = ? AND {column} = ? AND state = 'ok' LIMIT 1",
                         (hook, item.id)).fetchone()
        if ran:
            return SKIPPED, "it ran before the late files came (hook_rerun = no)"
    return WAITING, None


def add_notice(db: sqlite3.Connection, cfg: Config, moment: float, subject: str, body: dict) -> None:
    db.executemany("INSERT INTO notices (time, event, channel, subject, body, next_try) VALUES (?,?,?,?,?,?)",
                   [(moment, body["event"], channel, subject, json.dumps(body), moment) for channel in cfg.channels])


def mark_of(cfg: Config, run: int) -> str:
    """What each process of a run carries in its environment (hooks.MARK): this journal's run."""
    return f"{os.path.abspath(str(cfg.journal_path))}#{run}"


def recover(db: sqlite3.Connection, cfg: Config) -> list[str]:
    """At serve's start, before any hook runs: each run a killed serve left running has what is
    left of its process group killed, and runs again once; a second time, it is given up.
    Returns what was done, in words."""
    said = []
    with transaction(db):
        for row in db.execute("SELECT * FROM hook_runs WHERE state = 'running'").fetchall():
            killed = hooks.kill_leftover(row["pid"], row["pid_start"], mark_of(cfg, row["id"]))
            if row["restarts"] >= 1:
                why = "serve was killed while it ran, twice: not run again"
                db.execute("UPDATE hook_runs SET state = ?, restarts = restarts + 1, ended = ?, reason = ?"
                           " WHERE id = ?", (INTERRUPTED, time.time(), why, row["id"]))
                said.append(f"hook run {row['id']} was interrupted twice: given up")
            else:
                db.execute("UPDATE hook_runs SET state = ?, restarts = restarts + 1, pid = NULL WHERE id = ?",
                           (WAITING, row["id"]))
                said.append(f"hook run {row['id']} did not finish before serve stopped: it runs again"
                            + (" (what was left of it was killed)" if killed else ""))
    return said


@dataclass
class _Started:
    run: int
    pid: int
    start: int | None


@dataclass
class _Finished:
    run: int
    future: Future
    started: float


@dataclass
class _Sent:
    notice: int
    future: Future


@dataclass
class _Health:
    future: Future


class Actions:
    """serve's thread for hooks and notices. Construct it after the worker processes are forked."""

    def __init__(self, cfg: Config, db: sqlite3.Connection, lock_info: Callable[[], LockInfo]):
        self.cfg = cfg
        self.tally: Any = None  # status.Tally, made by the first health check
        self.db = db
        self.lock_info = lock_info
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.hook_pool = ThreadPoolExecutor(cfg.hook_workers, thread_name_prefix="hook",
                                            initializer=hooks.lower_priority)
        self.send_pool = ThreadPoolExecutor(1, thread_name_prefix="notice")
        self.health_pool = ThreadPoolExecutor(1, thread_name_prefix="health")
        self.running: set[int] = set()  # hook runs on the hook threads
        self.sending = False
        self.checking = False
        self.next_health = time.monotonic() + cfg.health_interval
        self.seen: list[bool] = []  # health as the last checks found it
        self.seen_warnings: list[bool] = []  # whether they found a warning
        self.programs = {}
        for key in (hooks.SERIES, hooks.STUDY):
            template = getattr(cfg, key)
            if template is not None:
                self.programs[key] = hooks.find_program(template.program)
                if self.programs[key] is None:
                    log.error("%s: the program %r is not found (on PATH or beside dumpwatch): each run fails until "
                              "it is installed", key, template.program)
        self.password: str | None = None
        if "email" in cfg.channels:
            try:
                self.password = notify.read_password(cfg.smtp_password_file)
            except OSError as exc:
                log.error("smtp_password_file %s cannot be read (%s): e-mail notices will fail",
                          cfg.smtp_password_file, exc.strerror or exc)
        self.marks = dict(db.execute("SELECT name, value FROM marks").fetchall())
        self.scanned = int(self.marks.get("quarantine") or 0)  # quarantined rows up to here are told of
        self.found: list[sqlite3.Row] = []  # quarantined since, not yet told of
        self.told_at = float(self.marks.get("quarantine_at") or 0)
        self.recovered = False  # recover() runs first on the thread: a locked journal must not stop serve

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="actions", daemon=True)
        self.thread.start()

    def poke(self) -> None:
        """Something was queued: look now."""
        self.events.put(None)

    def stop(self) -> None:
        """Stop: running hooks are killed and run again at the next start (not counted as an
        interruption); notices wait in the journal."""
        self.stopping.set()
        self.events.put(None)
        if self.thread is not None:
            self.thread.join(timeout=hooks.KILL_GRACE + 5)
        self.hook_pool.shutdown(wait=False, cancel_futures=True)
        self.send_pool.shutdown(wait=False, cancel_futures=True)
        self.health_pool.shutdown(wait=False, cancel_futures=True)
        self.db.close()

    # -- the thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._once()
            except sqlite3.Error as exc:  # a full disk, a locked journal: the queues wait, sorting goes on
                log.warning("hooks and notices wait: the journal cannot be written (%s)", exc)
                self.stopping.wait(10)
            except Exception:  # noqa: BLE001  (never let this thread die silently)
                log.exception("hooks and notices: an unexpected error; going on")
                self.stopping.wait(10)
            if self.stopping.is_set():
                self._finish()
                return
            try:
                item = self.events.get(timeout=TICK)
                while True:
                    if not self._taken(item):
                        break
                    item = self.events.get_nowait()
            except queue.Empty:
                pass

    def _taken(self, item: object) -> bool:
        """Take one event; False when the journal cannot record it now: it is put back, to be
        taken again after a pause (a run's end is never lost, nor a notice's)."""
        try:
            self._take(item)
            return True
        except sqlite3.Error as exc:
            log.warning("hooks and notices wait: the journal cannot be written (%s)", exc)
            self.events.put(item)
            self.stopping.wait(10)
            return False
        except Exception:  # noqa: BLE001  (a bug here must not end the thread)
            log.exception("hooks and notices: an unexpected error taking %r; going on", item)
            return True

    def _once(self) -> None:
        if not self.recovered:
            for line in recover(self.db, self.cfg):
                log.warning("%s", line)
            self.recovered = True
        self._dispatch()
        self._quarantined()
        self._health()
        self._send()

    def _finish(self) -> None:
        """Wait for the hook threads to kill their runs, and record them as waiting again."""
        deadline = time.monotonic() + hooks.KILL_GRACE + 2
        while self.running and time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._take(item)
            except Exception:  # noqa: BLE001  (stopping: the next start's recover() settles it)
                log.exception("hooks and notices: cannot record %r while stopping", item)
                break

    def _take(self, item: object) -> None:
        match item:
            case _Started(run, pid, start):
                self.db.execute("UPDATE hook_runs SET pid = ?, pid_start = ?, tries = tries + 1 WHERE id = ?",
                                (pid, start, run))
            case _Finished(run, future, started):
                self._finished(run, future, started)  # recorded first: a run is running until its end is
                self.running.discard(run)
            case _Sent(notice, future):
                self.sending = False
                self._sent(notice, future)
            case _Health(future):
                self.checking = False
                self._checked(future)

    # -- hooks ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while len(self.running) < self.cfg.hook_workers and not self.stopping.is_set():
            # One run at a time for a series or a study: a later completion's run waits for the one under way.
            row = self.db.execute(
                "SELECT * FROM hook_runs AS h WHERE state = 'waiting' AND NOT EXISTS (SELECT 1 FROM hook_runs AS r"
                " WHERE r.state = 'running' AND r.hook = h.hook AND r.study_id IS h.study_id"
                " AND r.series_id IS h.series_id) ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return
            try:
                argv, env = self._command(row)
            except Exception as exc:  # noqa: BLE001  (_CannotRun, or a bug: this run fails, the others go on)
                why = str(exc) if isinstance(exc, _CannotRun) else f"dumpwatch could not make its command: {exc!r}"
                self.db.execute("UPDATE hook_runs SET state = ?, reason = ?, started = ?, ended = ? WHERE id = ?",
                                (FAILED, why, time.time(), time.time(), row["id"]))
                log.error("%s for run %d not run: %s", row["hook"], row["id"], why)
                continue
            now = time.time()
            self.db.execute("UPDATE hook_runs SET state = 'running', started = ?, argv = ? WHERE id = ?",
                            (now, json.dumps(argv), row["id"]))
            self.running.add(row["id"])
            log.info("%s: running %s", row["hook"], " ".join(argv))
            future = self.hook_pool.submit(self._run, row["id"], argv, env)
            future.add_done_callback(partial(self._hook_done, row["id"], now))

    def _hook_done(self, run: int, started: float, future: Future) -> None:
        self.events.put(_Finished(run, future, started))

    def _command(self, row: sqlite3.Row) -> tuple[list[str], dict[str, str]]:
        """The run's arguments and environment, from the journal and the disk as they are now."""
        template = getattr(self.cfg, row["hook"])
        program = self.programs.get(row["hook"])
        if template is None:
            raise _CannotRun(f"{row['hook']} is no longer configured")
        if program is None:
            raise _CannotRun(f"the program {template.program!r} is not found (on PATH or beside dumpwatch)")
        values = self._values(row)
        if "output_dir" in template.names():
            assert self.cfg.hook_output_dir is not None  # the configuration requires it
            folder = hooks.output_dir(str(self.cfg.hook_output_dir), values)
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=self.cfg.dir_mode & 0o777)
            except OSError as exc:
                raise _CannotRun(f"hook_output_dir {folder} cannot be made: {exc.strerror or exc}") from None
            values["output_dir"] = str(folder)
        argv = template.fill(values)
        argv[0] = program
        env = hooks.environment(values)
        env[hooks.MARK] = mark_of(self.cfg, row["id"])
        return argv, env

    def _values(self, row: sqlite3.Row) -> dict[str, str]:
        out = Path(os.path.abspath(self.cfg.dir_out or "."))
        study = self.db.execute("SELECT * FROM studies WHERE id = ?", (row["study_id"],)).fetchone()
        if study is None:
            raise _CannotRun("its study is not in the journal")
        every = self.db.execute("SELECT * FROM series WHERE study_id = ? AND files > 0", (study["id"],)).fetchall()
        values = {"study_dir": str(out / (study["folder"] or "")), "subject": study["folder"] or "",
                  "subject_label": hooks.label(study["folder"] or ""),
                  "study_uid": study["study_uid"], "study_date": study["study_date"] or "", "dir_out": str(out),
                  "again": "0", "output_dir": ""}
        again = self.db.execute("SELECT again FROM completions WHERE id = ?", (row["completion_id"],)).fetchone()
        values["again"] = str(again[0] if again else 0)
        if row["hook"] == hooks.SERIES:
            series = next((s for s in every if s["id"] == row["series_id"]), None)
            if series is None:
                raise _CannotRun("its series is not in the journal")
            verdict = completion.verdict_of(series)
            folder = series["folder"] or ""
            values.update({
                "event": "series_complete", "series_dir": str(out / folder), "series_folder": folder.rsplit("/", 1)[-1],
                "series_number": series["number"] or "", "series_description": series["description"] or "",
                "series_uid": series["series_uid"], "modality": series["modality"] or "",
                "sender": ",".join(s for s in (series["senders"] or "").split(completion.SENDERS) if s),
                "files": str(series["files"]), "missing": str(verdict.missing_count),
                "verdict": VERDICTS[verdict.verdict], "summary": verdict.summary()})
            where = Path(values["series_dir"])
        else:
            verdicts = [completion.verdict_of(s) for s in every]
            kinds = {v.verdict for v in verdicts}
            values.update({
                "event": "study_complete", "series": str(len(every)), "files": str(sum(s["files"] for s in every)),
                "missing": str(sum(v.missing_count for v in verdicts)),
                "verdict": "incomplete" if completeness.INCOMPLETE in kinds else
                           "whole" if kinds == {completeness.WHOLE} else "unknown",
                "summary": "; ".join(f"{s['number']}: {v.summary()}" for s, v in zip(every, verdicts, strict=True)
                                     if v.verdict == completeness.INCOMPLETE) or "no images known missing"})
            where = Path(values["study_dir"])
        if not where.is_dir():
            raise _CannotRun(f"its folder {where} is gone (moved or removed since it was complete)")
        return values

    def _run(self, run_id: int, argv: list[str], env: dict[str, str]) -> hooks.Ran:
        """On a hook thread: the run, tried again while it fails (tenacity)."""
        def started(pid: int, start: int | None) -> None:
            self.events.put(_Started(run_id, pid, start))

        def attempt() -> hooks.Ran:
            if self.stopping.is_set():  # stopped while waiting to try again: the next start runs it
                return hooks.Ran(None, "", error="serve stopped before it ran")
            ran = hooks.run(argv, env, str(self.cfg.dir_out or "/"), self.cfg.hook_timeout, started, self.stopping)
            if not ran.ok and not self.stopping.is_set():
                log.warning("hook run %d failed: %s", run_id, ran.describe(self.cfg.hook_timeout))
            return ran

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.cfg.hook_retries + 1),
            wait=tenacity.wait_exponential(multiplier=self.cfg.hook_retry_wait, min=self.cfg.hook_retry_wait,
                                           max=max(self.cfg.hook_retry_wait, 3600)),
            retry=tenacity.retry_if_result(lambda ran: not ran.ok and not self.stopping.is_set()),
            sleep=self._pause, retry_error_callback=_last_result, reraise=True)
        return retrying(attempt)

    def _pause(self, seconds: float) -> None:
        """tenacity's sleep between tries: cut short when serve stops."""
        self.stopping.wait(seconds)

    def _finished(self, run: int, future: Future, started: float) -> None:
        now = time.time()
        try:
            ran: hooks.Ran = future.result()
        except Exception as exc:  # noqa: BLE001  (a bug here must not lose the run's end)
            ran = hooks.Ran(None, "", error=f"dumpwatch could not run it: {exc}")
        if self.stopping.is_set() and not ran.ok:
            self.db.execute("UPDATE hook_runs SET state = 'waiting', pid = NULL WHERE id = ?", (run,))
            log.info("hook run %d stopped with serve: it runs again at the next start", run)
            return
        state = OK if ran.ok else FAILED
        reason = None if ran.ok else ran.describe(self.cfg.hook_timeout)
        self.db.execute("UPDATE hook_runs SET state = ?, reason = ?, ended = ?, exit = ?, output = ? WHERE id = ?",
                        (state, reason, now, ran.exit, ran.output, run))
        if ran.ok:
            log.info("hook run %d ended well in %.1f s", run, now - started)
        else:
            log.error("hook run %d failed for good: %s; its last output: %s", run, reason,
                      ran.output.splitlines()[-1] if ran.output else "(none)")

    # -- notices -------------------------------------------------------------------------

    def _quarantined(self) -> None:
        """Quarantined files since the last such notice, told of at most once per notify_interval."""
        if "quarantine" not in self.cfg.notify_on or not self.cfg.channels:
            return
        rows = self.db.execute("SELECT id, outcome, done, name, reason FROM outcomes WHERE id > ? ORDER BY id"
                               " LIMIT 20000", (self.scanned,)).fetchall()
        for row in rows:
            if not row["done"]:
                break  # a move under way: it may yet be a quarantine; read again from here
            if row["outcome"] == "quarantined":
                self.found.append(row)
            self.scanned = row["id"]
        now = time.time()
        if not self.found or now - self.told_at < self.cfg.notify_interval:
            return
        subject, body = notify.quarantine(self.found, self.cfg.quarantine_dir, self.cfg.dir_out,
                                          self.cfg.notify_identifiers)
        with transaction(self.db) as db:
            add_notice(db, self.cfg, now, subject, body)
            db.executemany("INSERT INTO marks (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                           " SET value = excluded.value", [("quarantine", self.scanned), ("quarantine_at", now)])
        self.found, self.told_at = [], now

    def _health(self) -> None:
        if "health" not in self.cfg.notify_on or not self.cfg.channels or self.checking:
            return
        if time.monotonic() < self.next_health:
            return
        self.next_health = time.monotonic() + self.cfg.health_interval
        self.checking = True
        future = self.health_pool.submit(self._check)
        future.add_done_callback(lambda f: self.events.put(_Health(f)))

    def _check(self) -> tuple[bool, list[str], list[str]]:
        from dumpwatch import status  # status reads the configuration's files: imported where it is used

        if self.tally is None:
            self.tally = status.Tally()  # kept: a million journal rows are counted once, not every check
        data = status.report(self.cfg, own=self.lock_info(), tally=self.tally)
        return data["healthy"], data["problems"], data["warnings"]

    def _checked(self, future: Future) -> None:
        try:
            healthy, problems, warnings = future.result()
        except Exception as exc:  # noqa: BLE001
            log.warning("the health check failed: %s", exc)
            return
        self._warned(warnings)
        self.seen = (self.seen + [healthy])[-2:]
        told = self.marks.get("health", "healthy") == "healthy"
        if len(self.seen) < 2 or self.seen[0] != self.seen[1] or healthy == told:
            return
        subject, body = notify.health(healthy, problems, self.cfg.dir_out, self.cfg.notify_identifiers)
        with transaction(self.db) as db:
            add_notice(db, self.cfg, time.time(), subject, body)
            db.execute("INSERT INTO marks (name, value) VALUES ('health', ?) ON CONFLICT (name) DO UPDATE"
                       " SET value = excluded.value", ("healthy" if healthy else "unhealthy",))
        self.marks["health"] = "healthy" if healthy else "unhealthy"
        log.warning("%s", subject)

    def _warned(self, warnings: list[str]) -> None:
        """A warning (a disk past disk_warn, or filling within a day) is told once when it
        starts, seen in two checks running, as health is; its end is only marked."""
        self.seen_warnings = (self.seen_warnings + [bool(warnings)])[-2:]
        told = self.marks.get("warning", "no") == "yes"
        if len(self.seen_warnings) < 2 or self.seen_warnings[0] != self.seen_warnings[1] or bool(warnings) == told:
            return
        with transaction(self.db) as db:
            if warnings:
                subject, body = notify.warning(warnings, self.cfg.dir_out, self.cfg.notify_identifiers)
                add_notice(db, self.cfg, time.time(), subject, body)
                log.warning("%s", subject)
            db.execute("INSERT INTO marks (name, value) VALUES ('warning', ?) ON CONFLICT (name) DO UPDATE"
                       " SET value = excluded.value", ("yes" if warnings else "no",))
        self.marks["warning"] = "yes" if warnings else "no"

    def _send(self) -> None:
        if self.sending or self.stopping.is_set():
            return
        row = self.db.execute("SELECT * FROM notices WHERE state = 'waiting' AND next_try <= ? ORDER BY id LIMIT 1",
                              (time.time(),)).fetchone()
        if row is None:
            return
        if row["channel"] not in self.cfg.channels:
            self.db.execute("UPDATE notices SET state = 'failed', error = ? WHERE id = ?",
                            (f"{row['channel']} notices are no longer configured", row["id"]))
            return
        self.sending = True
        future = self.send_pool.submit(self._deliver, row["channel"], row["subject"], json.loads(row["body"]))
        future.add_done_callback(partial(self._notice_done, row["id"]))

    def _notice_done(self, notice: int, future: Future) -> None:
        self.events.put(_Sent(notice, future))

    def _deliver(self, channel: str, subject: str, body: dict) -> None:
        if channel == "email":
            notify.send_email(self.cfg, self.password, subject, body)
        else:
            assert self.cfg.notify_webhook is not None
            notify.post_webhook(self.cfg.notify_webhook, subject, body)

    def _sent(self, notice: int, future: Future) -> None:
        error = future.exception()
        now = time.time()
        if error is None:
            self.db.execute("UPDATE notices SET state = 'sent', sent = ?, tries = tries + 1, error = NULL"
                            " WHERE id = ?", (now, notice))
            return
        row = self.db.execute("SELECT tries, channel FROM notices WHERE id = ?", (notice,)).fetchone()
        tries = row["tries"] + 1
        why = f"{type(error).__name__}: {error}"[:500]
        if tries >= NOTICE_TRIES:
            self.db.execute("UPDATE notices SET state = 'failed', tries = ?, error = ? WHERE id = ?",
                            (tries, why, notice))
            log.error("a %s notice was given up after %d tries: %s", row["channel"], tries, why)
        else:
            first = max(1.0, min(NOTICE_WAIT, self.cfg.notify_interval))  # a site with a short interval hears soon
            wait = min(first * 2 ** (tries - 1), 3600)
            self.db.execute("UPDATE notices SET tries = ?, error = ?, next_try = ? WHERE id = ?",
                            (tries, why, now + wait, notice))
            log.warning("a %s notice could not be sent (%s): trying again in %.0f s", row["channel"], why, wait)


def _last_result(state: tenacity.RetryCallState) -> hooks.Ran:
    """When the tries are used up, the last run's result stands (it is journaled as failed)."""
    assert state.outcome is not None
    return state.outcome.result()


class _CannotRun(Exception):
    """A hook run that cannot start: the reason is journaled as its failure."""
