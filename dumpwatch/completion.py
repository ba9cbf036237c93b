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
from dumpwatch.facts import Facts
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


def note(db: sqlite3.Connection, facts: Iterable[tuple[str, Facts]]) -> None:
    """Make the series and study rows of files about to be placed (their counts come when
    they are: tally). The folder and description are the newest file's; once per series
    and batch."""
    newest: dict[str, Facts] = {}
    notes: dict[str, list[str]] = {}
    for series_uid, fact in facts:
        if series_uid:
            newest[series_uid] = fact
            if fact.frames_note:
                notes.setdefault(series_uid, []).append(fact.frames_note)
    for series_uid, fact in newest.items():
        frames_note = "; ".join(notes.get(series_uid, [])) or None
        folder = printable(fact.folder.split("/")[0])
        # A file without a StudyInstanceUID (it happens): its study is its study folder.
        study_uid = fact.study_uid or f"{NO_STUDY_UID} {folder}"
        db.execute("INSERT INTO studies (study_uid, folder, study_date) VALUES (?, ?, ?)"
                   " ON CONFLICT (study_uid) DO UPDATE SET folder = excluded.folder",
                   (study_uid, folder, printable(fact.study_date)))
        study_id = db.execute("SELECT id FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()[0]
        db.execute(
            "INSERT INTO series (series_uid, study_id, folder, number, description, modality, expected, expected_from,"
            " per_echo, frames_note) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (series_uid) DO UPDATE SET folder = excluded.folder,"
            " study_id = COALESCE(series.study_id, excluded.study_id),"
            " expected = COALESCE(excluded.expected, series.expected),"
            " expected_from = COALESCE(excluded.expected_from, series.expected_from),"
            " per_echo = CASE WHEN excluded.expected IS NULL THEN series.per_echo ELSE excluded.per_echo END,"
            " frames_note = COALESCE(series.frames_note || '; ', '') || excluded.frames_note",
            (series_uid, study_id, printable(fact.folder), printable(fact.series_number),
             printable(fact.description), printable(fact.modality), fact.expected, fact.expected_from or None,
             int(fact.per_echo), frames_note))


_ROWS = ("SELECT id, outcome, sop_uid, series_uid, instance, echo, frames, sender, received, frame_sets,"
         " frames_missing FROM outcomes"
         " WHERE id IN (SELECT value FROM json_each(?)) AND outcome IN ('sorted', 'duplicate') ORDER BY id")


def tally(db: sqlite3.Connection, ids: list[int], moment: float) -> set[int]:
    """Count the files of these journal rows, now placed, into their series and studies;
    returns the ids of the series counted into."""
    rows = db.execute(_ROWS, (json.dumps(ids),)).fetchall() if ids else []
    touched: set[int] = set()
    by_series: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        if row["series_uid"]:
            by_series.setdefault(row["series_uid"], []).append(row)
    for series_uid, files in by_series.items():
        series = db.execute("SELECT id, study_id, state, senders FROM series WHERE series_uid = ?",
                            (series_uid,)).fetchone()
        if series is None:
            continue  # a row from before the journal recorded series (or rebuilt from the tree)
        touched.add(series["id"])
        _count(db, series, files, moment)
    return touched


def _count(db: sqlite3.Connection, series: sqlite3.Row, files: list[sqlite3.Row], moment: float) -> None:
    senders = [s for s in (series["senders"] or "").split(",") if s]
    sorted_files = [f for f in files if f["outcome"] == Outcome.SORTED]
    resent = len(files) - len(sorted_files)
    for file in files:
        if file["sender"] and file["sender"] not in senders:
            senders.append(file["sender"])
    received = [f["received"] for f in sorted_files if f["received"] is not None]
    state = series["state"]
    if not sorted_files:  # identical re-sends only: nothing new; a complete series stays complete
        db.execute("UPDATE series SET resent = resent + ?, senders = ?,"
                   " touched = CASE WHEN state = 'complete' THEN touched ELSE ? END WHERE id = ?",
                   (resent, ",".join(senders), moment, series["id"]))
        return
    first, last = min(received, default=moment), max(received, default=moment)
    values = {"files": len(sorted_files), "frames": sum(f["frames"] or 1 for f in sorted_files),
              "sets": sum(f["frame_sets"] or 0 for f in sorted_files), "resent": resent,
              "missing": sum(f["frames_missing"] or 0 for f in sorted_files), "senders": ",".join(senders),
              "late": len(sorted_files) if state != RECEIVING else 0, "first": first, "last": last,
              "moment": moment, "id": series["id"], "study": series["study_id"]}
    db.execute(
        "UPDATE series SET files = files + :files, frames = frames + :frames, frame_sets = frame_sets + :sets,"
        " frames_missing = frames_missing + :missing, resent = resent + :resent, late = late + :late,"
        " senders = :senders, first = MIN(COALESCE(first, :first), :first), last = MAX(COALESCE(last, :last), :last),"
        " touched = :moment, state = CASE WHEN state = 'complete' THEN 'reopened' ELSE state END WHERE id = :id",
        values)
    db.execute(  # no row when the series has no study UID
        "UPDATE studies SET first = MIN(COALESCE(first, :first), :first), last = MAX(COALESCE(last, :last), :last),"
        " touched = :moment, state = CASE WHEN state = 'complete' THEN 'reopened' ELSE state END WHERE id = :study",
        values)
    _number(db, series["id"], sorted_files)


def _number(db: sqlite3.Connection, series_id: int, files: list[sqlite3.Row]) -> None:
    """Add the files' instance numbers to their echo's ranges; a number already there is a
    repeat unless it is the same instance placed again (deleted from the tree and re-sent)."""
    groups: dict[int, dict] = {}
    for row in db.execute("SELECT echo, ranges, repeats, unnumbered FROM numbers WHERE series_id = ?", (series_id,)):
        groups[row["echo"]] = {"ranges": completeness.parse(row["ranges"]),
                               "repeats": completeness.parse(row["repeats"]), "unnumbered": row["unnumbered"]}
    changed = set()
    for file in files:
        echo = file["echo"] or 0
        group = groups.setdefault(echo, {"ranges": [], "repeats": [], "unnumbered": 0})
        changed.add(echo)
        if file["instance"] is None:
            group["unnumbered"] += 1
            continue
        group["ranges"], there = completeness.add(group["ranges"], file["instance"])
        if there and not _placed_before(db, file):
            group["repeats"], _ = completeness.add(group["repeats"], file["instance"])
    db.executemany(
        "INSERT OR REPLACE INTO numbers (series_id, echo, ranges, count, repeats, unnumbered) VALUES (?,?,?,?,?,?)",
        [(series_id, echo, completeness.text(groups[echo]["ranges"]), completeness.count(groups[echo]["ranges"]),
          completeness.text(groups[echo]["repeats"]), groups[echo]["unnumbered"]) for echo in changed])


def _placed_before(db: sqlite3.Connection, file: sqlite3.Row) -> bool:
    return db.execute("SELECT 1 FROM outcomes WHERE sop_uid = ? AND outcome = 'sorted' AND done = 1 AND id < ?"
                      " LIMIT 1", (file["sop_uid"], file["id"])).fetchone() is not None


def groups_of(db: sqlite3.Connection, series_id: int) -> list[completeness.Group]:
    return [completeness.Group(r["echo"], completeness.parse(r["ranges"]), completeness.parse(r["repeats"]),
                               r["unnumbered"])
            for r in db.execute("SELECT * FROM numbers WHERE series_id = ? ORDER BY echo", (series_id,))]


def verdict_of(db: sqlite3.Connection, series: sqlite3.Row) -> completeness.Verdict:
    frames = completeness.Frames(series["frame_sets"], series["frames_missing"], series["frames_note"] or "")
    return completeness.judge(groups_of(db, series["id"]), series["expected"], bool(series["per_echo"]), frames)


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
        _mark(db, "series", series, moment)
        done.append(Completion("series", series["id"], series["folder"] or "", series["files"],
                               series["state"] == REOPENED, verdict_of(db, series).summary()))
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
            _mark(db, "study", study, moment)
            done.append(Completion("study", study["id"], study["folder"] or "", files, study["state"] == REOPENED))
    return done


def _mark(db: sqlite3.Connection, kind: str, row: sqlite3.Row, moment: float) -> None:
    table = "series" if kind == "series" else "studies"
    db.execute(f"UPDATE {table} SET state = 'complete', completed = ?, completions = completions + 1 WHERE id = ?",
               (moment, row["id"]))
    files = row["files"] if kind == "series" else db.execute(
        "SELECT COALESCE(SUM(files), 0) FROM series WHERE study_id = ?", (row["id"],)).fetchone()[0]
    db.execute("INSERT INTO completions (time, kind, series_id, study_id, again, files) VALUES (?,?,?,?,?,?)",
               (moment, kind, row["id"] if kind == "series" else None,
                row["study_id"] if kind == "series" else row["id"], int(row["state"] == REOPENED), files))
