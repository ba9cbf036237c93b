"""`dumpwatch status`: is all well? Read from the journal, the folders and the system."""

from __future__ import annotations

import calendar
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from dumpwatch import disk
from dumpwatch.config import Config
from dumpwatch.dumplock import LOCK_NAME, LockInfo, read_lock
from dumpwatch.reasons import STILL_ARRIVING, disk_full
from dumpwatch.reasons import kind as reason_kind
from dumpwatch.report import for_status, status_lines
from dumpwatch.text import printable

_RECENT = 5  # quarantined files listed with their reasons
_SKEW = 60  # seconds a file's time may lie ahead of ours before status calls it a clock problem
_ECHO_TIMEOUT = 2  # seconds for each step of a C-ECHO; storescp on this machine answers in milliseconds
LEFT_ALARM = 3  # times a file may be left in the dump for the same reason before status calls it a problem
REBUILT_ALARM = 86400  # seconds status is unhealthy after the journal was found new beside a full tree


def listening(port: int) -> bool:
    """True if some process listens on this TCP port (without connecting to it: a bare
    connection would make storescp log a failed association)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    local, state = fields[1], fields[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return False


class Echo:
    """A C-ECHO to 127.0.0.1:port as aetitle, under way while the rest of a report is made
    (echoscu takes a good part of a report's time: it starts, reads DCMTK's dictionary, then
    associates). DCMTK's echoscu, run as an argument list: no shell sees the AE title."""

    def __init__(self, port: int, aetitle: str):
        command = ["echoscu", "-to", str(_ECHO_TIMEOUT), "-ta", str(_ECHO_TIMEOUT), "-td", str(_ECHO_TIMEOUT),
                   "-aet", "DUMPWATCH-STATUS", "-aec", aetitle, "127.0.0.1", str(port)]
        try:
            self.process: subprocess.Popen | None = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                errors="replace", env={**os.environ, "TCP_NODELAY": "1"})  # Nagle's wait: 122 ms -> 75 ms
        except FileNotFoundError:
            self.process = None

    def close(self) -> None:
        """Kill and reap echoscu if it still runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate()

    def result(self) -> str | None:
        """None if the service answered; else why not."""
        if self.process is None:
            return "echoscu is not installed (apt-get install dcmtk)"
        try:
            out, err = self.process.communicate(timeout=5 * _ECHO_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            return f"no answer within {5 * _ECHO_TIMEOUT} s"
        if self.process.returncode == 0:
            return None
        lines = [line.strip() for line in (err + out).splitlines() if line.strip()]
        return lines[-1].removeprefix("F: ") if lines else f"exit status {self.process.returncode}"


def report(cfg: Config, own: LockInfo | None = None, quarantined: list[dict] | None = None,
           tally: Tally | None = None) -> dict:
    """Everything `status` shows, as plain data (`--json` prints it as it is). own: serve's
    own lock, when serve asks (its health notices): read_lock would drop serve's lock.
    quarantined: quarantine_files(), when the caller read them already (the web page).
    tally: the caller's Tally, kept from one report to the next (the web page, serve)."""
    up = listening(cfg.port)
    # Listening is not enough: another program may hold the port (storescp then stops with
    # FATAL, and every sender fails). A DICOM service must answer: asked now, heard at the end.
    pending = Echo(cfg.port, cfg.aetitle) if up else None
    try:
        return _report(cfg, own, quarantined, tally, up, pending)
    finally:
        if pending is not None:
            pending.close()  # (a report that failed half-way leaves no echoscu behind)


def _report(cfg: Config, own: LockInfo | None, quarantined: list[dict] | None, tally: Tally | None, up: bool,
            pending: Echo | None) -> dict:
    problems: list[str] = []
    result: dict = {"config": str(cfg.path) if cfg.path else None}
    result["storescp"] = {"port": cfg.port, "aetitle": cfg.aetitle, "listening": up, "answers": False}

    dump = cfg.dir_dump
    holder = own if own is not None else read_lock(dump) if dump else None
    result["watcher"] = {"running": holder is not None, **(holder.__dict__ if holder else {})}
    if holder is None:
        problems.append("dumpwatch serve is not running")
    elif holder.paused:
        problems.append(f"sorting is paused: {holder.paused}")

    waiting, oldest = _backlog(dump)
    left = holder.left if holder else []
    result["dump"] = {"path": str(dump) if dump else None, "waiting": waiting, "oldest_seconds": oldest,
                      "left": left}
    for item in left:
        # Left again and again for the same reason: it will not heal by waiting for backlog_alarm.
        # (Files still arriving wait by design; a full disk is a pause, said above.)
        if (item["tries"] >= LEFT_ALARM and not item["reason"].startswith(STILL_ARRIVING)
                and not disk_full(item["reason"])):
            files = f"{item['files']} file{'s' if item['files'] != 1 else ''}"
            problems.append(f"{files} in the dump cannot be sorted (tried {item['tries']} times): {item['reason']}")
    if oldest is not None and oldest > cfg.backlog_alarm:
        problems.append(f"a file has waited {oldest:.0f} s in the dump (alarm at {cfg.backlog_alarm:.0f} s)")
    elif oldest is not None and oldest < -_SKEW:
        # A dump on another machine (NFS) whose clock runs ahead: ages read from it mean nothing.
        problems.append(f"a file in the dump is dated {-oldest:.0f} s in the future: the clocks of this machine"
                        " and the dump's file server disagree (check NTP)")

    result.update(_from_journal(cfg.journal_path, tally))
    if result.get("journal_error"):
        problems.append(f"the journal {cfg.journal_path} cannot be read: {result['journal_error']}")
    rebuilt = (result.get("journal") or {}).get("rebuilt")
    if rebuilt and time.time() - _seconds(rebuilt["started"]) < REBUILT_ALARM:
        # Its history is lost for good; a day is long enough for a monitor to see it and a person to read why.
        problems.append(f"the journal was found new while the tree held files, at {rebuilt['started']}: its history"
                        f" before then is lost; {rebuilt['files']} files were rebuilt from the tree"
                        + ("" if rebuilt["finished"] else " (still under way)"))
    result["quarantine"] = _quarantine(cfg.quarantine_dir, quarantined)
    # No journal yet: nothing kept. A journal that cannot be read: no forecast.
    filesystems = disk.measure(cfg, result.pop("kept_last_day", {} if "journal_error" not in result else None))
    result["disk"] = disk.as_data(filesystems)
    full, warnings = disk.judge(filesystems, cfg)
    problems += full
    refused = pending.result() if pending is not None else "nothing listens"
    result["storescp"]["answers"] = refused is None
    if not up:
        problems.insert(0, f"nothing listens on port {cfg.port}: storescp is not running")
    elif refused:
        problems.insert(0, f"port {cfg.port} is open, but no DICOM service answers a C-ECHO there as AE title "
                        f"{cfg.aetitle} (echoscu: {refused})")
    result["problems"] = problems
    result["warnings"] = warnings
    result["healthy"] = not problems
    return result


def exit_code(data: dict) -> int:
    """status's exit status: 0 healthy, 1 unhealthy, 3 healthy with warnings (a disk filling)."""
    return 1 if not data["healthy"] else WARNING_EXIT if data["warnings"] else 0


WARNING_EXIT = 3


def _backlog(dump: Path | None) -> tuple[int, float | None]:
    if dump is None:
        return 0, None
    count, oldest = 0, None
    try:
        with os.scandir(dump) as entries:
            for entry in entries:
                if entry.name == LOCK_NAME or entry.is_dir(follow_symlinks=False):
                    continue
                count += 1
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:  # sorted while we looked
                    count -= 1
                    continue
                oldest = mtime if oldest is None else min(oldest, mtime)
    except FileNotFoundError:
        return 0, None
    return count, None if oldest is None else time.time() - oldest


def _from_journal(path: Path | None, tally: Tally | None = None) -> dict:
    if path is None or not path.exists():
        return {"sorted": {"last_hour": 0, "last_day": 0}, "last_series": None, "kept_last_day": {},
                "totals": {"files": dict.fromkeys(_COUNTED, 0), "quarantined_by_kind": {}}}
    db = None
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10)  # (a # in a path)
        return read_journal(db, path, tally)
    except sqlite3.Error as exc:
        return {"sorted": None, "last_series": None, "journal_error": str(exc)}
    finally:
        if db is not None:
            db.close()


def read_journal(db: sqlite3.Connection, path: Path, tally: Tally | None = None) -> dict:
    """What status tells from the journal. Each query reads by an index (tests/test_web.py
    checks their plans): a report stays fast at a million rows."""

    def since(seconds: int) -> int:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - seconds))
        return db.execute("SELECT count(*) FROM outcomes WHERE time >= ? AND outcome = 'sorted' AND done = 1",
                          (stamp,)).fetchone()[0]

    counts = {"last_hour": since(3600), "last_day": since(86400)}
    last = db.execute("SELECT dest, time FROM outcomes WHERE outcome = 'sorted' AND done = 1"
                      " ORDER BY id DESC LIMIT 1").fetchone()
    series = None
    if last:
        folder = os.path.dirname(last[0])
        files = db.execute("SELECT count(*) FROM outcomes WHERE outcome = 'sorted' AND done = 1"
                           " AND dest > ? AND dest < ?", (folder + "/", folder + "0")).fetchone()[0]
        series = {"subject": os.path.basename(os.path.dirname(folder)), "series": os.path.basename(folder),
                  "files": files, "last_file_at": last[1]}
    completions = for_status(db, time.time())
    totals = (tally or Tally()).totals(db, path)
    kept = disk.kept_last_day(db) if "size" in _columns(db, "outcomes") else None
    rebuilt = None
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rebuilds'").fetchone():
        row = db.execute("SELECT started, finished, files FROM rebuilds ORDER BY id DESC LIMIT 1").fetchone()
        rebuilt = row and {"started": row[0], "finished": row[1], "files": row[2]}
    return {"sorted": counts, "last_series": series, "journal": {"rebuilt": rebuilt}, "completion": completions,
            "totals": totals, "kept_last_day": kept}


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


_COUNTED = ("sorted", "duplicate", "quarantined")


class Tally:
    """Counts since the journal began, for /metrics (they only grow): files by outcome, files
    quarantined by kind of reason, series and studies by state, completions, hook runs by state.

    Counting a million rows by outcome takes a good part of a second, so a Tally is kept from
    one report to the next: a row that is done is never changed again (nor deleted), so the
    rows up to the first one still under way are counted once, and later only those after."""

    def __init__(self) -> None:
        self.journal: tuple[int, int] | None = None  # (device, inode) of the journal counted
        self._reset()

    @staticmethod
    def _row(db: sqlite3.Connection, row_id: int) -> tuple | None:
        found = db.execute("SELECT time, outcome, name FROM outcomes WHERE id = ?", (row_id,)).fetchone()
        return tuple(found) if found else None

    def _reset(self) -> None:
        self.mark: tuple | None = None  # the row with id upto, as counted
        self.upto = 0  # rows with id <= upto are in the counts below
        self.files = dict.fromkeys(_COUNTED, 0)
        self.kinds: dict[str, int] = {}

    def _add(self, db: sqlite3.Connection, low: int, high: int | None, files: dict, kinds: dict) -> None:
        bound = "" if high is None else " AND id <= ?"
        values = (low,) if high is None else (low, high)
        for outcome, count in db.execute(  # by the outcome index, within the id range
                f"SELECT outcome, count(*) FROM outcomes WHERE outcome IN {_COUNTED} AND done = 1 AND id > ?{bound}"
                " GROUP BY outcome", values):
            files[outcome] += count
        for reason, count in db.execute(  # (the partial index's WHERE, named whole, so that it is used)
                f"SELECT reason, count(*) FROM outcomes WHERE outcome IN {_COUNTED} AND done = 1 AND"
                f" outcome = 'quarantined' AND id > ?{bound} GROUP BY reason", values):
            label = reason_kind(reason)
            kinds[label] = kinds.get(label, 0) + count

    def totals(self, db: sqlite3.Connection, path: Path) -> dict:
        st = os.stat(path)
        pending = db.execute("SELECT min(id) FROM outcomes WHERE done = 0").fetchone()[0]
        upto = pending - 1 if pending is not None else db.execute("SELECT COALESCE(max(id), 0) FROM outcomes"
                                                                   ).fetchone()[0]
        # Another journal (a new inode may be the old one's number: check the last row counted too)
        if (st.st_dev, st.st_ino) != self.journal or upto < self.upto or self._row(db, self.upto) != self.mark:
            self._reset()
            self.journal = (st.st_dev, st.st_ino)
        if upto > self.upto:
            self._add(db, self.upto, upto, self.files, self.kinds)
            self.upto, self.mark = upto, self._row(db, upto)
        files, kinds = dict(self.files), dict(self.kinds)
        self._add(db, self.upto, None, files, kinds)  # done since, after a row still under way
        result: dict = {"files": files, "quarantined_by_kind": dict(sorted(kinds.items()))}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "series" in tables:
            result["series"] = dict(db.execute("SELECT state, count(*) FROM series WHERE files > 0 GROUP BY state"))
            result["completions"] = {k: 0 for k in ("series", "study")} | dict(
                db.execute("SELECT kind, count(*) FROM completions WHERE again = 0 GROUP BY kind"))
        if "hook_runs" in tables:
            result["hook_runs"] = dict(db.execute("SELECT state, count(*) FROM hook_runs GROUP BY state"))
        return result


def _seconds(text: str) -> float:
    """A journal time (UTC, ISO 8601) as a time.time() value."""
    try:
        return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def quarantine_files(folder: Path | None) -> list[dict]:
    """Every file in the quarantine with its reason (the first line of the file beside it) and
    when it came (that file's time), newest first."""
    found: list[dict] = []
    if folder is None:
        return found
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        if entry.name.endswith(".reason.txt"):
            continue
        reason_path = entry.path + ".reason.txt"
        try:
            with open(reason_path, encoding="utf-8", errors="replace") as file:
                reason = file.readline().strip()
            mtime = os.stat(reason_path).st_mtime
        except OSError:
            reason, mtime = "(no reason file)", 0.0
        found.append({"file": printable(entry.name), "reason": reason, "time": mtime, "kind": reason_kind(reason)})
    found.sort(key=lambda item: (-float(item["time"]), item["file"]))
    return found


def _quarantine(folder: Path | None, files: list[dict] | None = None) -> dict:
    files = quarantine_files(folder) if files is None else files
    kinds: dict[str, int] = {}
    for item in files:
        kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
    return {"path": str(folder) if folder else None, "files": len(files), "by_kind": dict(sorted(kinds.items())),
            "recent": [{"file": item["file"], "reason": item["reason"]} for item in files[:_RECENT]]}


def render(data: dict) -> str:
    """The report for a person."""
    lines = [f"dumpwatch status ({data['config'] or 'no configuration file'})"]
    scp = data["storescp"]
    state = "NOT listening" if not scp["listening"] else "listening" if scp["answers"] else "listening, NOT answering"
    lines.append(f"  storescp     {state} on port {scp['port']} (AE title {scp['aetitle']})")
    watcher = data["watcher"]
    lines.append("  watcher      " + (f"running, pid {watcher['pid']} on {watcher['host']}, since {watcher['since']}"
                                      if watcher["running"] else "NOT running"))
    if watcher.get("paused"):
        lines.append(f"               sorting PAUSED: {watcher['paused']}")
    dump = data["dump"]
    waiting = f"{dump['waiting']} files waiting"
    if dump["oldest_seconds"] is not None:
        waiting += f", the oldest for {max(0.0, dump['oldest_seconds']):.0f} s"
    lines.append(f"  dump         {dump['path']}: {waiting}")
    for item in dump.get("left", []):
        lines.append(f"               {item['files']} file{'s' if item['files'] != 1 else ''} left {item['tries']}"
                     f" time{'s' if item['tries'] != 1 else ''}: {item['reason']}")
    if data.get("sorted"):
        lines.append(f"  sorted       {data['sorted']['last_hour']:,} in the last hour, "
                     f"{data['sorted']['last_day']:,} in the last day")
    if data.get("journal_error"):
        lines.append(f"  journal      cannot be read: {data['journal_error']}")
    rebuilt = (data.get("journal") or {}).get("rebuilt")
    if rebuilt:
        lines.append(f"  journal      found new at {rebuilt['started']} beside a tree that held files: "
                     f"{rebuilt['files']} files rebuilt from the tree, the history before is lost")
    series = data.get("last_series")
    if series:
        lines.append(f"  last series  {series['subject']}/{series['series']}: {series['files']} files, "
                     f"the last at {series['last_file_at']}")
    lines += status_lines(data.get("completion") or {})
    quarantine = data["quarantine"]
    lines.append(f"  quarantine   {quarantine['path']}: {quarantine['files']} files")
    for item in quarantine["recent"]:
        lines.append(f"               {item['file']}: {item['reason']}")
    for number, fs in enumerate(data.get("disk") or []):
        shown = disk.Filesystem(**fs).shown()
        mark = {"warn": "  (WARNING)", "alarm": "  (ALARM)"}.get(fs["level"], "")
        lines.append(("  disk         " if number == 0 else "               ") + shown + mark)
    if not data["healthy"]:
        lines.append("UNHEALTHY: " + "; ".join(data["problems"]))
    elif data.get("warnings"):
        lines.append("healthy, with a WARNING: " + "; ".join(data["warnings"]))
    else:
        lines.append("healthy")
    return "\n".join(lines)
