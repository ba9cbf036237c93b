"""Series and studies in the journal: what each holds (counted in the same transaction that
journals a file as placed, so a kill -9 never counts a file twice or not at all), and when
each is complete (a row in `completions`, written in the transaction that marks it: a
completion is never lost nor repeated). The SQL here runs inside the journal's transactions."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from dumpwatch import completeness
from dumpwatch.facts import FRAMES_NOTE, Facts
from dumpwatch.outcomes import Outcome
from dumpwatch.text import printable

RECEIVING, COMPLETE, REOPENED = "receiving", "complete", "reopened"
NO_STUDY_UID = "(no StudyInstanceUID)"


@dataclass
class Completion:
    kind: str  # series or study
    id: int
    folder: str
    files: int
    again: bool  # it had been complete before
    verdict: str = ""  # a series' completeness, in words
    whole: str = ""  # a series' verdict: completeness.WHOLE, INCOMPLETE or NO_EXPECTATION
    row: int = 0  # its row in completions


def note(db: sqlite3.Connection, facts: Iterable[tuple[str, Facts]], noted: dict[str, tuple]) -> None:
    """Make the series and study rows of files about to be placed (their counts come when
    they are: tally). The folder and description are the newest file's. A few statements a
    batch, whatever its size, and none for series this process wrote just so before
    (`noted`, series UID -> what it wrote): this runs under the tree's lock, on every batch."""
    newest: dict[str, Facts] = {}
    for series_uid, fact in facts:
        if series_uid:
            newest[series_uid] = fact
    for series_uid, fact in list(newest.items()):
        said = (fact.study_uid, fact.folder, fact.series_number, fact.description, fact.modality, fact.expected,
                fact.expected_from, fact.per_echo, fact.study_date)
        if noted.get(series_uid) == said:
            del newest[series_uid]  # its rows hold this already (rows are never removed)
        else:
            noted[series_uid] = said
    if not newest:
        return
    studies = {}
    for fact in newest.values():
        folder = printable(fact.folder.split("/")[0])
        # A file without a StudyInstanceUID (it happens): its study is its study folder.
        studies[fact.study_uid or f"{NO_STUDY_UID} {folder}"] = (folder, printable(fact.study_date))
    db.executemany("INSERT INTO studies (study_uid, folder, study_date) VALUES (?, ?, ?)"
                   " ON CONFLICT (study_uid) DO UPDATE SET folder = excluded.folder",
                   [(uid, folder, date) for uid, (folder, date) in studies.items()])
    ids = dict(db.execute("SELECT study_uid, id FROM studies WHERE study_uid IN (SELECT value FROM json_each(?))",
                          (json.dumps(list(studies)),)).fetchall())
    db.executemany(
        "INSERT INTO series (series_uid, study_id, folder, number, description, modality, expected, expected_from,"
        " per_echo) VALUES (?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (series_uid) DO UPDATE SET folder = excluded.folder,"
        " study_id = COALESCE(series.study_id, excluded.study_id),"
        " expected = COALESCE(excluded.expected, series.expected),"
        " expected_from = COALESCE(excluded.expected_from, series.expected_from),"
        " per_echo = CASE WHEN excluded.expected IS NULL THEN series.per_echo ELSE excluded.per_echo END",
        [(uid, ids[f.study_uid or f"{NO_STUDY_UID} {printable(f.folder.split('/')[0])}"], printable(f.folder),
          printable(f.series_number), printable(f.description), printable(f.modality), f.expected,
          f.expected_from or None, int(f.per_echo)) for uid, f in newest.items()])


_ROWS = ("SELECT id, outcome, sop_uid, series_uid, instance, echo, frames, sender, received, frame_sets,"
         " frames_missing, frames_note FROM outcomes"
         " WHERE id IN (SELECT id FROM uncounted WHERE id > ? ORDER BY id LIMIT ?)"
         " AND outcome IN ('sorted', 'duplicate') AND done = 1 ORDER BY id")
CATCH_UP = 20_000  # rows counted at a time: memory stays flat however many wait


def placed(db: sqlite3.Connection, ids: list[int]) -> None:
    """Files journalled as placed, in the transaction that says so: counted at the next
    catch_up. One insert a batch; the counting itself is done for many batches at once."""
    if ids:
        db.execute("INSERT OR IGNORE INTO uncounted (id) SELECT value FROM json_each(?)", (json.dumps(ids),))


def waiting(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM uncounted LIMIT 1").fetchone() is not None


def catch_up(db: sqlite3.Connection, moment: float) -> set[int]:
    """Count every file placed since the last catch-up into its series and study, in the
    caller's transaction: a kill before its commit leaves them to count again, never
    counted twice. Returns the ids of the series counted into."""
    touched: set[int] = set()
    after = 0
    while True:
        last = db.execute("SELECT MAX(id) FROM (SELECT id FROM uncounted WHERE id > ? ORDER BY id LIMIT ?)",
                          (after, CATCH_UP)).fetchone()[0]
        if last is None:
            break
        touched |= tally(db, moment, after, CATCH_UP)
        after = last
    db.execute("DELETE FROM uncounted")
    return touched
SENDERS = "\\"  # between a series' senders: the one character an AE title cannot hold


def tally(db: sqlite3.Connection, moment: float, after: int, limit: int) -> set[int]:
    """Count the files of `limit` uncounted rows from id `after` on into their series and
    studies; returns the ids of the series counted into. A few statements, whatever the
    number of files."""
    rows = db.execute(_ROWS, (after, limit)).fetchall()
    by_series: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        if row["series_uid"]:
            by_series.setdefault(row["series_uid"], []).append(row)
    if not by_series:
        return set()
    found = db.execute("SELECT id, series_uid, study_id, state, senders, frames_note, numbers FROM series"
                       " WHERE series_uid IN (SELECT value FROM json_each(?))", (json.dumps(list(by_series)),))
    series = {row["series_uid"]: row for row in found}  # none: from before the journal recorded series
    counts: list[dict] = []
    studies: dict[int, tuple[float, float]] = {}
    for uid, files in by_series.items():
        if uid in series:
            values = _count(series[uid], files, moment)
            placed = [f for f in files if f["outcome"] == Outcome.SORTED]
            values["numbers"] = _numbered(db, series[uid]["numbers"], placed) if placed else series[uid]["numbers"]
            counts.append(values)
            if values["files"]:
                first, last = studies.get(values["study"], (values["first"], values["last"]))
                studies[values["study"]] = (min(first, values["first"]), max(last, values["last"]))
    db.executemany(
        "UPDATE series SET files = files + :files, frames = frames + :frames, frame_sets = frame_sets + :sets,"
        " frames_missing = frames_missing + :missing, resent = resent + :resent, late = late + :late,"
        " senders = :senders, frames_note = :note, numbers = :numbers,"
        " first = CASE WHEN :files THEN MIN(COALESCE(first, :first), :first) ELSE first END,"
        " last = CASE WHEN :files THEN MAX(COALESCE(last, :last), :last) ELSE last END,"
        " touched = CASE WHEN :files OR state != 'complete' THEN :moment ELSE touched END,"
        " state = CASE WHEN :files AND state = 'complete' THEN 'reopened' ELSE state END WHERE id = :id",
        counts)
    db.executemany(
        "UPDATE studies SET first = MIN(COALESCE(first, ?), ?), last = MAX(COALESCE(last, ?), ?), touched = ?,"
        " state = CASE WHEN state = 'complete' THEN 'reopened' ELSE state END WHERE id = ?",
        [(first, first, last, last, moment, study) for study, (first, last) in studies.items()])
    return {row["id"] for row in series.values()}


def _count(series: sqlite3.Row, files: list[sqlite3.Row], moment: float) -> dict:
    """One series' UPDATE values for the files of a batch. Identical re-sends alone change
    nothing but their count: a complete series stays complete."""
    senders = [s for s in (series["senders"] or "").split(SENDERS) if s]
    for file in files:
        if file["sender"] and file["sender"] not in senders:
            senders.append(file["sender"])
    placed = [f for f in files if f["outcome"] == Outcome.SORTED]
    received = [f["received"] for f in placed if f["received"] is not None]
    notes = [series["frames_note"] or ""] + [f["frames_note"] for f in placed if f["frames_note"]]
    return {"files": len(placed), "frames": sum(f["frames"] or 1 for f in placed),
            "sets": sum(f["frame_sets"] or 0 for f in placed), "resent": len(files) - len(placed),
            "missing": sum(f["frames_missing"] or 0 for f in placed), "senders": SENDERS.join(senders),
            "note": "; ".join(n for n in notes if n)[:FRAMES_NOTE] or None,
            "late": len(placed) if series["state"] != RECEIVING else 0,
            "first": min(received, default=moment), "last": max(received, default=moment),
            "moment": moment, "id": series["id"], "study": series["study_id"]}


def numbers_of(text: str | None) -> dict[int, completeness.Group]:
    """A series' numbers column, per echo."""
    groups = json.loads(text) if text else {}
    return {int(echo): completeness.Group(int(echo), g["ranges"], g["repeats"], g["unnumbered"])
            for echo, g in groups.items()}


def _numbered(db: sqlite3.Connection, text: str | None, files: list[sqlite3.Row]) -> str:
    """The numbers column with the files' instance numbers added to their echo's ranges; a
    number already there is a repeat unless it is the same instance placed again (deleted
    from the tree and re-sent)."""
    groups = json.loads(text) if text else {}  # as stored: {"echo": {"ranges": [[a, b], ...], ...}}
    for file in files:
        group = groups.setdefault(str(file["echo"] or 0), {"ranges": [], "repeats": [], "unnumbered": 0})
        if file["instance"] is None:
            group["unnumbered"] += 1
            continue
        group["ranges"], there = completeness.add(group["ranges"], file["instance"])
        if there and not _placed_before(db, file):
            group["repeats"], _ = completeness.add(group["repeats"], file["instance"])
    return json.dumps(groups, separators=(",", ":"))


def _placed_before(db: sqlite3.Connection, file: sqlite3.Row) -> bool:
    return db.execute("SELECT 1 FROM outcomes WHERE sop_uid = ? AND outcome = 'sorted' AND done = 1 AND id < ?"
                      " LIMIT 1", (file["sop_uid"], file["id"])).fetchone() is not None


def verdict_of(series: sqlite3.Row) -> completeness.Verdict:
    frames = completeness.Frames(series["frame_sets"], series["frames_missing"], series["frames_note"] or "")
    groups = sorted(numbers_of(series["numbers"]).values(), key=lambda g: g.echo)
    return completeness.judge(groups, series["expected"], bool(series["per_echo"]), frames)


def due(db: sqlite3.Connection, moment: float, series_idle: float, study_idle: float) -> bool:
    """Whether any series or study may be due to complete (a read, before a write transaction)."""
    return db.execute(
        "SELECT 1 FROM series WHERE state != 'complete' AND files > 0 AND touched <= ?"
        " UNION ALL SELECT 1 FROM studies WHERE state != 'complete' AND touched <= ? LIMIT 1",
        (moment - series_idle, moment - study_idle)).fetchone() is not None


def complete(db: sqlite3.Connection, moment: float, series_idle: float, study_idle: float,
             held: set[str] | None, only: set[int] | None = None) -> list[Completion]:
    """Mark complete each open series idle for series_idle (none held back: held None holds
    them all), then each open study whose series all are and which was idle for study_idle.
    With `only` (series ids: sort-once's own), those complete now whatever their idle time,
    and the rest as idle times say."""
    done: list[Completion] = []
    if held is None:
        return done
    candidates = db.execute("SELECT * FROM series WHERE state != 'complete' AND files > 0 AND touched <= ?",
                            (moment - series_idle,)).fetchall()
    if only is not None:
        idle = {row["id"] for row in candidates}
        candidates += [db.execute("SELECT * FROM series WHERE id = ? AND state != 'complete' AND files > 0",
                                  (i,)).fetchone() for i in sorted(only - idle)]
    studies = set()
    for series in candidates:
        if series is None or series["series_uid"] in held:
            continue
        row = _mark(db, "series", series, moment)
        verdict = verdict_of(series)
        done.append(Completion("series", series["id"], series["folder"] or "", series["files"],
                               series["state"] == REOPENED, verdict.summary(), verdict.verdict, row))
        studies.add(series["study_id"])
    open_studies = db.execute("SELECT * FROM studies WHERE state != 'complete' AND touched <= ?",
                              (moment - study_idle,)).fetchall()
    if only is not None:
        idle = {row["id"] for row in open_studies}
        open_studies += [db.execute("SELECT * FROM studies WHERE id = ? AND state != 'complete'", (i,)).fetchone()
                         for i in sorted(s for s in studies - idle if s is not None)]
    for study in open_studies:
        if study is None:
            continue
        unfinished = db.execute("SELECT 1 FROM series WHERE study_id = ? AND state != 'complete' AND files > 0"
                                " LIMIT 1", (study["id"],)).fetchone()
        files = db.execute("SELECT COALESCE(SUM(files), 0) FROM series WHERE study_id = ?",
                           (study["id"],)).fetchone()[0]
        if unfinished is None and files:
            row = _mark(db, "study", study, moment)
            done.append(Completion("study", study["id"], study["folder"] or "", files, study["state"] == REOPENED,
                                   row=row))
    return done


def _mark(db: sqlite3.Connection, kind: str, row: sqlite3.Row, moment: float) -> int:
    """Mark it complete; returns its row in completions."""
    table = "series" if kind == "series" else "studies"
    db.execute(f"UPDATE {table} SET state = 'complete', completed = ?, completions = completions + 1 WHERE id = ?",
               (moment, row["id"]))
    files = row["files"] if kind == "series" else db.execute(
        "SELECT COALESCE(SUM(files), 0) FROM series WHERE study_id = ?", (row["id"],)).fetchone()[0]
    cursor = db.execute("INSERT INTO completions (time, kind, series_id, study_id, again, files) VALUES (?,?,?,?,?,?)",
                        (moment, kind, row["id"] if kind == "series" else None,
                         row["study_id"] if kind == "series" else row["id"], int(row["state"] == REOPENED), files))
    return cursor.lastrowid or 0
