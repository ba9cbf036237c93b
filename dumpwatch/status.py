"""`dumpwatch status`: is all well? Read from the journal, the folders and the system."""

from __future__ import annotations

import calendar
import os
import sqlite3
import subprocess
import time
from pathlib import Path

from dumpwatch.config import Config
from dumpwatch.dumplock import LOCK_NAME, LockInfo, read_lock
from dumpwatch.reasons import STILL_ARRIVING, disk_full
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


def echo(port: int, aetitle: str) -> str | None:
    """None if a DICOM service on 127.0.0.1:port answers a C-ECHO as aetitle; else why not.

    DCMTK's echoscu, run as an argument list: no shell ever sees the configured AE title.
    """
    command = ["echoscu", "-to", str(_ECHO_TIMEOUT), "-ta", str(_ECHO_TIMEOUT), "-td", str(_ECHO_TIMEOUT),
               "-aet", "DUMPWATCH-STATUS", "-aec", aetitle, "127.0.0.1", str(port)]
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                errors="replace", timeout=5 * _ECHO_TIMEOUT, check=False)
    except FileNotFoundError:
        return "echoscu is not installed (apt-get install dcmtk)"
    except subprocess.TimeoutExpired:
        return f"no answer within {5 * _ECHO_TIMEOUT} s"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1].removeprefix("F: ") if lines else f"exit status {result.returncode}"


def report(cfg: Config, own: LockInfo | None = None) -> dict:
    """Everything `status` shows, as plain data (`--json` prints it as it is). own: serve's
    own lock, when serve asks (its health notices): read_lock would drop serve's lock."""
    problems: list[str] = []
    result: dict = {"config": str(cfg.path) if cfg.path else None}

    up = listening(cfg.port)
    # Listening is not enough: another program may hold the port (storescp then stops with
    # FATAL, and every sender fails). A DICOM service must answer.
    refused = echo(cfg.port, cfg.aetitle) if up else "nothing listens"
    result["storescp"] = {"port": cfg.port, "aetitle": cfg.aetitle, "listening": up, "answers": refused is None}
    if not up:
        problems.append(f"nothing listens on port {cfg.port}: storescp is not running")
    elif refused:
        problems.append(f"port {cfg.port} is open, but no DICOM service answers a C-ECHO there as AE title "
                        f"{cfg.aetitle} (echoscu: {refused})")

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

    result.update(_from_journal(cfg.journal_path))
    if result.get("journal_error"):
        problems.append(f"the journal {cfg.journal_path} cannot be read: {result['journal_error']}")
    rebuilt = (result.get("journal") or {}).get("rebuilt")
    if rebuilt and time.time() - _seconds(rebuilt["started"]) < REBUILT_ALARM:
        # Its history is lost for good; a day is long enough for a monitor to see it and a person to read why.
        problems.append(f"the journal was found new while the tree held files, at {rebuilt['started']}: its history"
                        f" before then is lost; {rebuilt['files']} files were rebuilt from the tree"
                        + ("" if rebuilt["finished"] else " (still under way)"))
    result["quarantine"] = _quarantine(cfg.quarantine_dir)
    result["problems"] = problems
    result["healthy"] = not problems
    return result


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


def _from_journal(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {"sorted": {"last_hour": 0, "last_day": 0}, "last_series": None}
    db = None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

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
        rebuilt = None
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rebuilds'").fetchone():
            row = db.execute("SELECT started, finished, files FROM rebuilds ORDER BY id DESC LIMIT 1").fetchone()
            rebuilt = row and {"started": row[0], "finished": row[1], "files": row[2]}
    except sqlite3.Error as exc:
        return {"sorted": None, "last_series": None, "journal_error": str(exc)}
    finally:
        if db is not None:
            db.close()
    return {"sorted": counts, "last_series": series, "journal": {"rebuilt": rebuilt}, "completion": completions}


def _seconds(text: str) -> float:
    """A journal time (UTC, ISO 8601) as a time.time() value."""
    try:
        return calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def _quarantine(folder: Path | None) -> dict:
    result: dict = {"path": str(folder) if folder else None, "files": 0, "recent": []}
    if folder is None or not folder.is_dir():
        return result
    reasons = []
    for entry in os.scandir(folder):
        if entry.name.endswith(".reason.txt"):
            continue
        result["files"] += 1
        reason_path = entry.path + ".reason.txt"
        try:
            with open(reason_path, encoding="utf-8", errors="replace") as file:
                reason = file.readline().strip()
            mtime = os.stat(reason_path).st_mtime
        except OSError:
            reason, mtime = "(no reason file)", 0.0
        reasons.append((mtime, printable(entry.name), reason))
    reasons.sort(reverse=True)
    result["recent"] = [{"file": name, "reason": reason} for _, name, reason in reasons[:_RECENT]]
    return result


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
    lines.append("healthy" if data["healthy"] else "UNHEALTHY: " + "; ".join(data["problems"]))
    return "\n".join(lines)
