"""Disk space: how full the filesystems of the sorted tree, the quarantine and the dump are,
their watermarks (disk_warn, disk_alarm) and how many hours are left at the last day's rate.

Nothing is ever deleted to make room: dumpwatch tells, early, and people decide. The rate is
the bytes that stayed on a filesystem in the last day (files sorted into the tree, files
quarantined), from the journal; a dump on a filesystem of its own only passes files through,
so it gets watermarks and no forecast. Hooks' outputs (NIfTI beside the tree) are not in the
rate: a forecast, not a promise.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dumpwatch.config import Config

DAY = 86400
FILLS_SOON = 24  # hours: a filesystem that fills sooner at the last day's rate warns below disk_warn
ROLES = ("sorted tree", "quarantine", "dump")  # in the order they are shown


@dataclass
class Filesystem:
    path: str  # the first role's folder (or the nearest folder above it that exists)
    roles: list[str]
    size: int  # bytes
    free: int  # bytes an unprivileged writer may still use (df's Avail)
    used_percent: float  # as df shows it: used / (used + available)
    level: str = "ok"  # ok, warn, alarm
    passes: bool = False  # only the dump is here: files pass through, no forecast
    rate: float | None = None  # bytes a day that stayed here in the last day (None: unknown)
    hours_left: float | None = None  # at that rate (None: no rate, or nothing arrived)
    error: str | None = None  # why it could not be measured

    def shown(self) -> str:
        """One line: 'sorted tree, quarantine: 42.0% used, 120.3 GB free, about 310 hours left'."""
        if self.error:
            return f"{', '.join(self.roles)}: cannot be measured ({self.error})"
        text = f"{', '.join(self.roles)} ({self.path}): {self.used_percent:.1f}% used, {gigabytes(self.free)} free"
        return text + ", " + forecast(self)


def gigabytes(count: int | float) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e8 else f"{count / 1e6:,.1f} MB"


def forecast(fs: Filesystem) -> str:
    if fs.passes:
        return "files pass through"
    if fs.rate is None:
        return "no forecast (the journal does not say)"
    if fs.hours_left is None:
        return "nothing kept in the last day"
    if fs.hours_left > 24 * 365:
        return f"more than a year left at the last day's {gigabytes(fs.rate)}"
    return f"about {fs.hours_left:,.0f} hours left at the last day's {gigabytes(fs.rate)}"


def _existing(path: Path) -> Path:
    """path, or the nearest folder above it that exists (a tree not made yet lands there)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def kept_last_day(db: sqlite3.Connection, moment: float | None = None) -> dict[str, float]:
    """Bytes sorted and quarantined in the last day, by outcome. Rows from before the journal
    recorded sizes count at the mean size of those that have one."""
    moment = time.time() if moment is None else moment
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment - DAY))
    kept: dict[str, float] = {}
    for outcome, files, sized, total in db.execute(
            "SELECT outcome, count(*), count(size), COALESCE(sum(size), 0) FROM outcomes"
            " WHERE time >= ? AND outcome IN ('sorted', 'quarantined') AND done = 1 GROUP BY outcome", (since,)):
        kept[outcome] = total * files / sized if sized else 0.0
    return kept


def measure(cfg: Config, kept: dict[str, float] | None) -> list[Filesystem]:
    """The filesystems of the tree, the quarantine and the dump, each once; kept: bytes a day by
    outcome (kept_last_day), or None when the journal could not say."""
    where = {"sorted tree": cfg.dir_out, "quarantine": cfg.quarantine_dir, "dump": cfg.dir_dump}
    found: dict[int, Filesystem] = {}
    shown: list[Filesystem] = []
    for role in ROLES:
        folder = where[role]
        if folder is None:
            continue
        path = _existing(folder)
        try:
            device = os.stat(path).st_dev
            vfs = os.statvfs(path)
        except OSError as exc:
            shown.append(Filesystem(str(folder), [role], 0, 0, 0.0, error=exc.strerror or str(exc)))
            continue
        if device in found:
            found[device].roles.append(role)
            continue
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        free = vfs.f_bavail * vfs.f_frsize
        percent = 100.0 * used / (used + free) if used + free else 100.0
        fs = Filesystem(str(path), [role], vfs.f_blocks * vfs.f_frsize, free, round(percent, 2))
        found[device] = fs
        shown.append(fs)
    for fs in shown:
        if fs.error:
            continue
        fs.level = "alarm" if fs.used_percent >= cfg.disk_alarm else "warn" if fs.used_percent >= cfg.disk_warn \
            else "ok"
        fs.passes = fs.roles == ["dump"]
        if kept is None or fs.passes:
            continue
        fs.rate = (kept.get("sorted", 0.0) if "sorted tree" in fs.roles else 0.0) + \
            (kept.get("quarantined", 0.0) if "quarantine" in fs.roles else 0.0)
        fs.hours_left = round(fs.free / (fs.rate / 24), 1) if fs.rate > 0 else None
    return shown


def as_data(filesystems: list[Filesystem]) -> list[dict]:
    return [asdict(fs) for fs in filesystems]


def judge(filesystems: list[Filesystem], cfg: Config) -> tuple[list[str], list[str]]:
    """(problems, warnings): a filesystem at disk_alarm makes status unhealthy, at disk_warn it warns."""
    problems, warnings = [], []
    for fs in filesystems:
        if fs.error:
            problems.append(f"the {' and '.join(fs.roles)} cannot be measured: {fs.error}")
        elif fs.level == "alarm":
            problems.append(f"the filesystem of the {' and '.join(fs.roles)} is {fs.used_percent:.0f}% full (alarm at "
                            f"{cfg.disk_alarm}%): {gigabytes(fs.free)} free, {forecast(fs)}; dumpwatch deletes "
                            "nothing to make room")
        elif fs.level == "warn":
            warnings.append(f"the filesystem of the {' and '.join(fs.roles)} is {fs.used_percent:.0f}% full (warning "
                            f"at {cfg.disk_warn}%): {gigabytes(fs.free)} free, {forecast(fs)}")
        elif fs.hours_left is not None and fs.hours_left < FILLS_SOON:
            warnings.append(f"the filesystem of the {' and '.join(fs.roles)} fills within {FILLS_SOON} hours at the "
                            f"last day's rate: {gigabytes(fs.free)} free, {forecast(fs)}")
    return problems, warnings
