"""`dumpwatch status`: is all well? Read from the journal, the folders and the system."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from dumpwatch.config import Config
from dumpwatch.journal import printable
from dumpwatch.watcher import LOCK_NAME, read_lock

_RECENT = 5  # quarantined files listed with their reasons
_SKEW = 60  # seconds a file's time may lie ahead of ours before status calls it a clock problem


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


def report(cfg: Config) -> dict:
    """Everything `status` shows, as plain data (`--json` prints it as it is)."""
    problems: list[str] = []
    result: dict = {"config": str(cfg.path) if cfg.path else None}

    up = listening(cfg.port)
    result["storescp"] = {"port": cfg.port, "aetitle": cfg.aetitle, "listening": up}
    if not up:
        problems.append(f"nothing listens on port {cfg.port}: storescp is not running")

    dump = cfg.dir_dump
    holder = read_lock(dump) if dump else None
    result["watcher"] = {"running": holder is not None, **(holder.__dict__ if holder else {})}
    if holder is None:
        problems.append("dumpwatch serve is not running")
    elif holder.paused:
        problems.append(f"sorting is paused: {holder.paused}")

    waiting, oldest = _backlog(dump)
    result["dump"] = {"path": str(dump) if dump else None, "waiting": waiting, "oldest_seconds": oldest}
    if oldest is not None and oldest > cfg.backlog_alarm:
        problems.append(f"a file has waited {oldest:.0f} s in the dump (alarm at {cfg.backlog_alarm:.0f} s)")
    elif oldest is not None and oldest < -_SKEW:
        # A dump on another machine (NFS) whose clock runs ahead: ages read from it mean nothing.
        problems.append(f"a file in the dump is dated {-oldest:.0f} s in the future: the clocks of this machine"
                        " and the dump's file server disagree (check NTP)")

    result.update(_from_journal(cfg.journal_path))
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
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
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
    except sqlite3.Error as exc:
        return {"sorted": None, "last_series": None, "journal_error": str(exc)}
    finally:
        db.close()
    return {"sorted": counts, "last_series": series}


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
    lines.append(f"  storescp     {'listening' if scp['listening'] else 'NOT listening'} on port {scp['port']}"
                 f" (AE title {scp['aetitle']})")
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
    if data.get("sorted"):
        lines.append(f"  sorted       {data['sorted']['last_hour']:,} in the last hour, "
                     f"{data['sorted']['last_day']:,} in the last day")
    if data.get("journal_error"):
        lines.append(f"  journal      cannot be read: {data['journal_error']}")
    series = data.get("last_series")
    if series:
        lines.append(f"  last series  {series['subject']}/{series['series']}: {series['files']} files, "
                     f"the last at {series['last_file_at']}")
    quarantine = data["quarantine"]
    lines.append(f"  quarantine   {quarantine['path']}: {quarantine['files']} files")
    for item in quarantine["recent"]:
        lines.append(f"               {item['file']}: {item['reason']}")
    lines.append("healthy" if data["healthy"] else "UNHEALTHY: " + "; ".join(data["problems"]))
    return "\n".join(lines)
