"""`dumpwatch report`: studies and their series as the journal knows them: files, instance
numbers, gaps, the verdict, the state (receiving, complete, reopened), arrivals and senders.
Read from the journal's series tables alone (never from the tree, never from one row per file)."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from dumpwatch import completeness, completion, schema
from dumpwatch.text import printable


class ReportError(Exception):
    """The journal cannot give a report (absent, unreadable, not yet migrated)."""


_RELATIVE = re.compile(r"(\d+)\s*([dhm])")


def parse_since(text: str, moment: float | None = None) -> float:
    """A date or time (local), YYYY-MM-DD[ HH:MM[:SS]], or an age: 2d, 12h, 30m."""
    text = text.strip()
    found = _RELATIVE.fullmatch(text)
    if found and len(found.group(1)) <= 6:
        unit = {"d": 86400, "h": 3600, "m": 60}[found.group(2)]
        return (time.time() if moment is None else moment) - int(found.group(1)) * unit
    try:
        return datetime.fromisoformat(text).timestamp()  # naive: local time
    except ValueError:
        raise ValueError(f"not a date such as 2026-12-01, a time such as '2026-12-01 14:00', or an age such as "
                         f"2d or 12h: {text!r}") from None


def open_journal(path: Path | None) -> sqlite3.Connection:
    """The journal, read-only; ReportError when it cannot report."""
    if path is None or not path.exists():
        raise ReportError(f"no journal at {path}" if path else "no journal: set dir_out or journal")
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        current = schema.version(db)
    except sqlite3.Error as exc:
        raise ReportError(f"the journal {path} cannot be read: {exc}") from None
    if current < schema.LATEST:
        db.close()
        raise ReportError(f"the journal {path} is from an older dumpwatch (schema {current}); it records series "
                          "once serve or sort-once has opened it (they migrate it)")
    return db


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):  # a time no calendar holds: shown as it is
        return str(seconds)


def _series(row: sqlite3.Row) -> dict:
    verdict = completion.verdict_of(row)
    numbers = verdict.numbers
    low = min((r[0][0] for r in numbers.values() if r), default=None)
    high = max((r[-1][1] for r in numbers.values() if r), default=None)
    return {
        "series_uid": row["series_uid"], "folder": row["folder"], "number": row["number"],
        "description": row["description"], "modality": row["modality"],
        "senders": [s for s in (row["senders"] or "").split(completion.SENDERS) if s],
        "files": row["files"], "frames": row["frames"], "frame_sets": row["frame_sets"],
        "frames_missing": row["frames_missing"], "resent": row["resent"], "late": row["late"],
        "first": iso(row["first"]), "last": iso(row["last"]), "state": row["state"],
        "completed": iso(row["completed"]), "completions": row["completions"],
        "instances": {"first": low, "last": high, "per_echo": verdict.per_echo,
                      "echoes": {str(e): completeness.shown(r) for e, r in sorted(numbers.items())}},
        "expected": row["expected"], "expected_from": row["expected_from"],
        "verdict": verdict.verdict, "missing": {str(e): [list(r) for r in m] for e, m in verdict.missing.items()},
        "missing_count": verdict.missing_count,
        "repeats": {str(e): [list(r) for r in m] for e, m in verdict.repeats.items()},
        "summary": verdict.summary(),
    }


def gather(db: sqlite3.Connection, since: float | None = None, subject: str | None = None,
           incomplete: bool = False, limit: int | None = None) -> list[dict]:
    """Studies (newest first) with their series, as report prints them; limit: at most so many."""
    values: list[float | str] = []
    where = ["EXISTS (SELECT 1 FROM series WHERE study_id = studies.id AND files > 0)"]
    if since is not None:
        where.append("last >= ?")
        values.append(since)
    if subject:
        where.append("instr(lower(folder), lower(?)) > 0")
        values.append(subject)
    studies: list[dict] = []
    for study in db.execute(f"SELECT * FROM studies WHERE {' AND '.join(where)} ORDER BY last DESC, id DESC", values):
        runs = _hook_runs(db, study["id"])
        series = [{**_series(row), "hook": runs.get(row["id"])} for row in db.execute(
            "SELECT * FROM series WHERE study_id = ? AND files > 0 ORDER BY first, id", (study["id"],))]
        if incomplete:
            series = [s for s in series if s["verdict"] == completeness.INCOMPLETE or s["state"] != completion.COMPLETE]
            if not series:
                continue
        if limit is not None and len(studies) >= limit:
            break
        studies.append({
            "study_uid": study["study_uid"], "folder": study["folder"], "study_date": study["study_date"],
            "state": study["state"], "first": iso(study["first"]), "last": iso(study["last"]),
            "completed": iso(study["completed"]), "files": sum(s["files"] for s in series),
            "senders": list(dict.fromkeys(x for s in series for x in s["senders"])), "hook": runs.get(None),
            "series": series})
    return studies


def _hook_runs(db: sqlite3.Connection, study_id: int) -> dict[int | None, dict]:
    """The last hook run of each series of a study (by series id), and of the study (None)."""
    runs: dict[int | None, dict] = {}
    for row in db.execute("SELECT * FROM hook_runs WHERE study_id = ? ORDER BY id", (study_id,)):
        runs[row["series_id"]] = hook_run(row)
    return runs


def hook_run(row: sqlite3.Row) -> dict:
    ended, started = row["ended"], row["started"]
    return {"hook": row["hook"], "state": row["state"], "reason": row["reason"], "exit": row["exit"],
            "tries": row["tries"], "restarts": row["restarts"], "queued": iso(row["queued"]),
            "started": iso(started), "ended": iso(ended),
            "seconds": round(ended - started, 3) if ended is not None and started is not None else None,
            "output": row["output"]}


def hook_shown(run: dict | None) -> str:
    """A hook run in a few words, for report and status."""
    if run is None:
        return ""
    state = run["state"]
    if state == "ok":
        return f"hook ok in {run['seconds']:.1f} s" if run["seconds"] is not None else "hook ok"
    if state in ("failed", "interrupted", "skipped") and run["reason"]:
        return f"hook {state}: {run['reason']}"
    return f"hook {state}"


def _local(stamp: str | None) -> str:
    if not stamp:
        return "-"
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return stamp


def _instances(series: dict) -> str:
    numbers = series["instances"]
    if numbers["first"] is None:
        return "unnumbered"
    echoes = len(numbers["echoes"])
    span = f"{numbers['first']}-{numbers['last']}" if numbers["first"] != numbers["last"] else str(numbers["first"])
    return span + (f" x{echoes} echoes" if numbers["per_echo"] and echoes > 1 else "")


def render(studies: Iterable[dict]) -> str:
    lines = []
    for study in studies:
        senders = ", ".join(study["senders"]) or "sender not recorded"
        lines.append(f"{printable(study['folder'] or '(no folder)')}  {study['state']}  {len(study['series'])} series,"
                     f" {study['files']} files  from {printable(senders)}  {_local(study['first'])} .. "
                     f"{_local(study['last'])[11:]}" + (f"  ({printable(hook_shown(study['hook']))})"
                                                        if study.get("hook") else ""))
        for s in study["series"]:
            name = printable((s["folder"] or "").rsplit("/", 1)[-1] or s["description"] or s["series_uid"])
            extra = []
            if s["frames"] > s["files"]:
                extra.append(f"{s['frames']} frames")
            if s["late"]:
                extra.append(f"{s['late']} late")
            if s["resent"]:
                extra.append(f"{s['resent']} re-sent")
            if s.get("hook"):
                extra.append(printable(hook_shown(s["hook"])))
            if any(s["repeats"].values()):
                extra.append("repeated numbers " + "; ".join(
                    completeness.shown(tuple(r) for r in m) for m in s["repeats"].values()))
            lines.append(f"  {name:<32} {s['files']:>5} files  {_instances(s):<18} {s['state']:<9}"
                         f" {printable(s['summary'])}" + (f"  ({', '.join(extra)})" if extra else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else "no series recorded for that choice\n"


STATUS_SHOWN = 20  # incomplete series status lists by name; report --incomplete lists them all


def for_status(db: sqlite3.Connection, moment: float) -> dict:
    """What `status` shows of completion: the series completed last, and every series of the
    last day that is not complete yet or misses images."""
    if schema.version(db) < 2:
        return {"last_complete": None, "incomplete": []}
    db.row_factory = sqlite3.Row
    row = db.execute("SELECT * FROM series WHERE state = 'complete' ORDER BY completed DESC LIMIT 1").fetchone()
    last = _brief(_series(row)) if row is not None else None
    recent = [_series(r) for r in db.execute(
        "SELECT * FROM series WHERE last >= ? AND files > 0 ORDER BY first, id", (moment - 86400,))]
    incomplete = [_brief(s) for s in recent
                  if s["verdict"] == completeness.INCOMPLETE or s["state"] != completion.COMPLETE]
    return {"last_complete": last, "incomplete": incomplete, **_after(db, moment)}


def _after(db: sqlite3.Connection, moment: float) -> dict:
    """Hook runs of the last day by state, the failures among them, and notices not sent."""
    if schema.version(db) < 3:
        return {}
    states = dict(db.execute("SELECT state, count(*) FROM hook_runs WHERE queued >= ? GROUP BY state",
                             (moment - 86400,)).fetchall())
    failed = []
    for row in db.execute("SELECT hook_runs.*, COALESCE(series.folder, studies.folder) AS folder FROM hook_runs"
                          " LEFT JOIN series ON series.id = hook_runs.series_id"
                          " LEFT JOIN studies ON studies.id = hook_runs.study_id"
                          " WHERE hook_runs.state IN ('failed', 'interrupted') AND hook_runs.queued >= ?"
                          " ORDER BY hook_runs.id DESC LIMIT 5", (moment - 86400,)):
        failed.append({"folder": row["folder"], **hook_run(row)})
    notices = dict(db.execute("SELECT state, count(*) FROM notices WHERE state != 'sent' OR sent >= ?"
                              " GROUP BY state", (moment - 86400,)).fetchall())
    error = db.execute("SELECT error FROM notices WHERE state != 'sent' AND error IS NOT NULL ORDER BY id DESC"
                       " LIMIT 1").fetchone()
    return {"hooks": {"last_day": states, "failed": failed},
            "notices": {"waiting": notices.get("waiting", 0), "failed": notices.get("failed", 0),
                        "sent_last_day": notices.get("sent", 0), "last_error": error[0] if error else None}}


def _brief(series: dict) -> dict:
    keys = ("folder", "files", "state", "verdict", "summary", "completed", "last", "senders")
    return {k: series[k] for k in keys}


def status_lines(data: dict) -> list[str]:
    lines = []
    last = data.get("last_complete")
    if last:
        lines.append(f"  completed    {printable(last['folder'] or '')}: {last['files']} files, "
                     f"{printable(last['summary'])}, at {_local(last['completed'])}")
    incomplete = data.get("incomplete") or []
    for item in incomplete[:STATUS_SHOWN]:
        lines.append(f"  incomplete   {printable(item['folder'] or '')}: {item['files']} files, {item['state']}, "
                     f"{printable(item['summary'])}")
    if len(incomplete) > STATUS_SHOWN:
        lines.append(f"               ... and {len(incomplete) - STATUS_SHOWN} more: dumpwatch report --incomplete "
                     "--since 1d")
    hooks = data.get("hooks")
    if hooks and hooks["last_day"]:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(hooks["last_day"].items()))
        lines.append(f"  hooks        in the last day: {counts}")
        for run in hooks["failed"]:
            where, why = printable(run["folder"] or ""), printable(run["reason"] or "")
            lines.append(f"               {run['state']}: {where}: {why}")
    notices = data.get("notices")
    if notices and (notices["waiting"] or notices["failed"] or notices["sent_last_day"]):
        line = f"  notices      {notices['sent_last_day']} sent in the last day"
        if notices["waiting"] or notices["failed"]:
            line += f", {notices['waiting']} waiting, {notices['failed']} given up"
        if notices["last_error"] and (notices["waiting"] or notices["failed"]):
            line += f" (last error: {printable(notices['last_error'])})"
        lines.append(line)
    return lines
