"""Prometheus metrics: what `status --json` says, in the exposition format, built from the
same report so that the two never disagree. Served on the web port's /metrics, or written as
a textfile for node_exporter's textfile collector (`dumpwatch metrics --textfile FILE`).

Counts since the journal began are counters (_total); what is true now is a gauge. Labels
come from bounded sets only (outcomes, kinds of reason, states, filesystem roles): never a
file's name or a reason's own text.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from dumpwatch import __version__
from dumpwatch.reasons import KINDS, OTHER

ROLE = {"sorted tree": "tree", "quarantine": "quarantine", "dump": "dump"}
SERIES_STATES = ("receiving", "complete", "reopened")
HOOK_STATES = ("waiting", "running", "ok", "failed", "skipped", "interrupted")


def families(status: dict) -> Iterator[Metric]:
    """The metric families of one status report."""
    info = InfoMetricFamily("dumpwatch", "the dumpwatch that answers")
    info.add_metric([], {"version": __version__})
    yield info
    yield _gauge("dumpwatch_healthy", "1 when status says healthy, else 0", int(status["healthy"]))
    yield _gauge("dumpwatch_problems", "problems status names (each makes it unhealthy)", len(status["problems"]))
    yield _gauge("dumpwatch_warnings", "warnings status names (a disk filling)", len(status.get("warnings", [])))
    scp, watcher, dump = status["storescp"], status["watcher"], status["dump"]
    up = GaugeMetricFamily("dumpwatch_up", "1 when the program runs (storescp: answers a C-ECHO)", labels=["program"])
    up.add_metric(["storescp"], int(scp["listening"] and scp["answers"]))
    up.add_metric(["serve"], int(watcher["running"]))
    yield up
    yield _gauge("dumpwatch_paused", "1 while serve has paused sorting (a full disk, the journal)",
                 int(bool(watcher.get("paused"))))
    yield _gauge("dumpwatch_backlog_files", "files waiting in the dump", dump["waiting"])
    yield _gauge("dumpwatch_backlog_oldest_seconds", "how long the oldest file has waited in the dump (0: none)",
                 max(0.0, dump["oldest_seconds"] or 0.0))
    yield _gauge("dumpwatch_backlog_left_files", "files serve left in the dump for a reason (status names it)",
                 sum(item["files"] for item in dump.get("left", [])))
    totals = status.get("totals") or {}
    files = CounterMetricFamily("dumpwatch_files", "files handled since the journal began, by outcome",
                                labels=["outcome"])
    for outcome, count in (totals.get("files") or {}).items():
        files.add_metric([outcome], count)
    yield files
    quarantined = CounterMetricFamily("dumpwatch_quarantined", "files quarantined since the journal began, by kind "
                                      "of reason", labels=["reason"])
    by_kind = totals.get("quarantined_by_kind") or {}
    for label in [k[0] for k in KINDS] + [OTHER[0]]:
        quarantined.add_metric([label], by_kind.get(label, 0))
    yield quarantined
    quarantine = GaugeMetricFamily("dumpwatch_quarantine_files", "files in the quarantine folder now, by kind of "
                                   "reason", labels=["reason"])
    for label, count in (status["quarantine"].get("by_kind") or {}).items():
        quarantine.add_metric([label], count)
    yield quarantine
    if status.get("sorted"):
        yield _gauge("dumpwatch_sorted_last_hour_files", "files sorted in the last hour", status["sorted"]["last_hour"])
        yield _gauge("dumpwatch_sorted_last_day_files", "files sorted in the last day", status["sorted"]["last_day"])
    if "series" in totals:
        series = GaugeMetricFamily("dumpwatch_series", "series in the journal, by state", labels=["state"])
        for state in SERIES_STATES:
            series.add_metric([state], totals["series"].get(state, 0))
        yield series
        completed = CounterMetricFamily("dumpwatch_completed", "series and studies that became complete (the first "
                                        "time each)", labels=["kind"])
        for kind, count in totals["completions"].items():
            completed.add_metric([kind], count)
        yield completed
    completion = status.get("completion") or {}
    if "incomplete" in completion:
        yield _gauge("dumpwatch_series_incomplete", "series of the last day not complete yet or missing images",
                     len(completion["incomplete"]))
    if "hook_runs" in totals:
        runs = GaugeMetricFamily("dumpwatch_hook_runs", "hook runs in the journal, by state (failed: given up after "
                                 "its retries)", labels=["state"])
        for state in HOOK_STATES:
            runs.add_metric([state], totals["hook_runs"].get(state, 0))
        yield runs
    notices = completion.get("notices")
    if notices:
        waiting = GaugeMetricFamily("dumpwatch_notices", "notices not sent, by state", labels=["state"])
        waiting.add_metric(["waiting"], notices["waiting"])
        waiting.add_metric(["failed"], notices["failed"])
        yield waiting
    yield from _disk(status.get("disk") or [])


def _disk(filesystems: list[dict]) -> Iterator[Metric]:
    free = GaugeMetricFamily("dumpwatch_disk_free_bytes", "bytes free (for an unprivileged writer) on the "
                             "filesystem of the tree, the quarantine, the dump", labels=["role"])
    size = GaugeMetricFamily("dumpwatch_disk_size_bytes", "size of that filesystem", labels=["role"])
    used = GaugeMetricFamily("dumpwatch_disk_used_ratio", "how full it is, as df shows it (0 to 1)", labels=["role"])
    level = GaugeMetricFamily("dumpwatch_disk_level", "0 below disk_warn, 1 at disk_warn, 2 at disk_alarm",
                              labels=["role"])
    left = GaugeMetricFamily("dumpwatch_disk_fills_in_seconds", "time until it is full at the last day's rate "
                             "(absent: nothing kept, or files only pass through)", labels=["role"])
    rate = GaugeMetricFamily("dumpwatch_disk_kept_bytes_per_day", "bytes kept on it in the last day (sorted, "
                             "quarantined)", labels=["role"])
    for fs in filesystems:
        if fs["error"]:
            continue
        for role in fs["roles"]:
            label = [ROLE.get(role, role)]
            free.add_metric(label, fs["free"])
            size.add_metric(label, fs["size"])
            used.add_metric(label, round(fs["used_percent"] / 100, 4))
            level.add_metric(label, {"ok": 0, "warn": 1, "alarm": 2}[fs["level"]])
            if fs["hours_left"] is not None:
                left.add_metric(label, fs["hours_left"] * 3600)
            if fs["rate"] is not None:
                rate.add_metric(label, fs["rate"])
    yield from (free, size, used, level, left, rate)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Report:
    """A collector over one status report (prometheus_client asks it for families)."""

    def __init__(self, status: dict):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        return families(self.status)


def exposition(status: dict) -> bytes:
    """The text /metrics answers (Prometheus' text format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Report(status))
    return generate_latest(registry)


def write_textfile(status: dict, path: Path) -> None:
    """For node_exporter's textfile collector: written beside, then renamed into place, so it
    never reads half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(exposition(status))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
