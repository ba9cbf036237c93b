"""Hooks after the scan, end to end: the real storescp receives from the real storescu,
`dumpwatch serve` sorts, completes, and runs the configured program (the real dcm2niix, or a
small recorder) as an argument list, never through a shell."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from dcmtk import Serve, Storescp, storescu, wait_for, write_config
from pydicom.uid import generate_uid
from test_completion import port_of, report

from dumpwatch import hooks

from helpers import make_dicom

IDLE = {"series_idle": 1, "study_idle": 2}


def volume(template: Path, folder: Path, count: int, skip: tuple[int, ...] = (), **fields: object) -> list[Path]:
    """A GE series of `count` axial slices 3 mm apart (ImagesInAcquisition says how many), made
    from a real scanner file: a volume dcm2niix converts. `skip`: instances left out."""
    fields = {"SeriesInstanceUID": generate_uid(), "StudyInstanceUID": generate_uid(),
              "Manufacturer": "GE MEDICAL SYSTEMS", "ImagesInAcquisition": count,
              "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], **fields}
    files = []
    for number in range(1, count + 1):
        if number not in skip:
            files.append(make_dicom(folder / f"{number:03}.dcm", template, InstanceNumber=str(number),
                                    ImagePositionPatient=[-100, -100, 3.0 * number], SliceLocation=3.0 * number,
                                    SliceThickness=3, SpacingBetweenSlices=3, **fields))
    return files


def journal(site: Path) -> sqlite3.Connection:
    db = sqlite3.connect(site.parent / "sorted" / ".dumpwatch" / "journal.sqlite3", timeout=30)
    db.row_factory = sqlite3.Row
    return db


def runs(site: Path) -> list[sqlite3.Row]:
    db = journal(site)
    try:
        return db.execute("SELECT * FROM hook_runs ORDER BY id").fetchall()
    finally:
        db.close()


def ended(site: Path, count: int, timeout: float = 60) -> list[sqlite3.Row]:
    """Wait until `count` hook runs are over (not waiting, not running)."""
    def over():
        rows = runs(site)
        return rows if len(rows) >= count and all(r["state"] not in ("waiting", "running") for r in rows) else None
    return wait_for(over, timeout, f"{count} hook runs to end")


RECORDER = """\
import json, os, sys, time
log = sys.argv[1]
with open(log, "a") as f:
    f.write(json.dumps({"start": time.time(), "pid": os.getpid(), "argv": sys.argv[2:],
                        "env": {k: v for k, v in os.environ.items() if k.startswith("DUMPWATCH_")}}) + "\\n")
time.sleep(float(os.environ.get("HOOK_SLEEP", "0")))
with open(log, "a") as f:
    f.write(json.dumps({"end": time.time(), "pid": os.getpid()}) + "\\n")
"""


def recorder(tmp_path: Path, arguments: str) -> tuple[str, Path]:
    """A hook template running the recorder with these arguments, and the file it writes."""
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    log = tmp_path / "hook.log"
    return f"{shlex.quote(sys.executable)} {script} {log} {arguments}", log


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.dcmtk
def test_a_whole_series_becomes_nifti_and_one_missing_an_image_runs_no_hook(tmp_path, template_file):
    nifti = tmp_path / "nifti"
    site = write_config(tmp_path / "site", **IDLE, hook_output_dir=f"{nifti}/{{subject}}",
                        on_series_complete="dcm2niix -z y -b y -f {series_folder} -o {output_dir} {series_dir}")
    scp, serve = Storescp(site), Serve(site)
    try:
        study = generate_uid()
        whole = volume(template_file, tmp_path / "whole", 12, StudyInstanceUID=study, SeriesNumber=3,
                       SeriesDescription="t1 axial")
        lacking = volume(template_file, tmp_path / "lacking", 12, skip=(7,), StudyInstanceUID=study, SeriesNumber=4,
                         SeriesDescription="t2 axial")
        storescu(port_of(site), whole + lacking, tmp_path)
        done = ended(site, 2)
        by_state = {r["state"]: r for r in done}
        assert set(by_state) == {"ok", "skipped"}, [dict(r) for r in done]
        assert by_state["skipped"]["reason"] == "not whole: missing 1 (7) (hook_when = whole)"
        assert by_state["skipped"]["tries"] == 0 and by_state["skipped"]["started"] is None
        ok = by_state["ok"]
        assert ok["exit"] == 0 and ok["tries"] == 1 and "Convert 12 DICOM" in ok["output"]
        subject = report(site)["studies"][0]["folder"]
        made = sorted(p.name for p in (nifti / subject).iterdir())
        assert made == ["003-t1-axial.json", "003-t1-axial.nii.gz"], made
        sidecar = json.loads((nifti / subject / "003-t1-axial.json").read_text())
        assert sidecar["SeriesDescription"] == "t1 axial"
        series = {s["number"]: s for s in report(site)["studies"][0]["series"]}
        assert series["3"]["hook"]["state"] == "ok" and series["3"]["hook"]["exit"] == 0
        assert series["4"]["hook"]["state"] == "skipped" and series["4"]["verdict"] == "incomplete"
        text = os.popen(f"{shlex.quote(sys.executable)} -m dumpwatch --config {site} report").read()
        assert "hook skipped: not whole: missing 1 (7)" in text and "hook ok in" in text
        status = os.popen(f"{shlex.quote(sys.executable)} -m dumpwatch --config {site} status").read()
        assert "hooks        in the last day: 1 ok, 1 skipped" in status
    finally:
        assert serve.stop() == 0
        scp.stop()


HOSTILE = ["$(touch {pwned})", "; rm -rf ~", "--help", "-o /etc", "a'b\"c `d` | e > f &"]


@pytest.mark.dcmtk
def test_header_values_reach_the_hook_as_one_inert_argument_each(tmp_path, template_file):
    pwned = tmp_path / "pwned"
    template, log = recorder(tmp_path, "{series_description} x{series_description} {series_number}")
    site = write_config(tmp_path / "site", **IDLE, on_series_complete=template, hook_when="always")
    scp, serve = Storescp(site), Serve(site)
    try:
        descriptions = [d.format(pwned=pwned) for d in HOSTILE]
        files = []
        for number, description in enumerate(descriptions, start=1):
            files += volume(template_file, tmp_path / str(number), 2, SeriesNumber=number,
                            SeriesDescription=description)
        storescu(port_of(site), files, tmp_path)
        done = ended(site, len(descriptions))
        assert all(r["state"] == "ok" for r in done), [dict(r) for r in done]
        seen = {r["argv"][2]: r for r in records(log) if "argv" in r}
        assert len(seen) == len(descriptions)
        for number, description in enumerate(descriptions, start=1):
            record = seen[str(number)]
            first = "_" + description if description.startswith("-") else description
            assert record["argv"] == [first, "x" + description, str(number)]  # three arguments, as written
            assert record["env"]["DUMPWATCH_SERIES_DESCRIPTION"] == description
            assert record["env"]["DUMPWATCH_EVENT"] == "series_complete"
        assert not pwned.exists()
    finally:
        assert serve.stop() == 0
        scp.stop()


HANGS = """\
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
signal_ignored = __import__("signal").signal(15, lambda *a: None)  # it ignores SIGTERM: SIGKILL follows
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.dcmtk
def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path, template_file):
    script, pids = tmp_path / "hangs.py", tmp_path / "pids"
    script.write_text(HANGS)
    site = write_config(tmp_path / "site", **IDLE, hook_timeout=2, hook_retries=0,
                        on_series_complete=f"{shlex.quote(sys.executable)} {script} {pids}")
    scp, serve = Storescp(site), Serve(site)
    try:
        storescu(port_of(site), volume(template_file, tmp_path / "a", 2), tmp_path)
        wait_for(lambda: pids.exists() and pids.read_text(), 60, "the hook to start")
        leader, child = map(int, pids.read_text().split())
        assert alive(leader) and alive(child)
        run = ended(site, 1, timeout=30)[0]
        assert run["state"] == "failed" and run["reason"].startswith("still running after hook_timeout (2 s)")
        assert 2 <= run["ended"] - run["started"] < 2 + hooks.KILL_GRACE + 5
        wait_for(lambda: not alive(leader) and not alive(child), 10, "the hook and its child to be gone")
    finally:
        assert serve.stop() == 0
        scp.stop()


@pytest.mark.dcmtk
def test_kill_9_of_serve_while_a_hook_runs_runs_it_again_exactly_once(tmp_path, template_file):
    template, log = recorder(tmp_path, "{series_number}")
    site = write_config(tmp_path / "site", **IDLE, on_series_complete=template)
    os.environ["HOOK_SLEEP"] = "4"
    try:
        scp, serve = Storescp(site), Serve(site, session=True)
    finally:
        del os.environ["HOOK_SLEEP"]
    try:
        storescu(port_of(site), volume(template_file, tmp_path / "a", 2), tmp_path)
        wait_for(lambda: records(log), 60, "the hook to start")
        first = records(log)[0]["pid"]
        os.killpg(serve.process.pid, signal.SIGKILL)  # serve and its workers; the hook is in its own session
        serve.process.wait(timeout=30)
        serve.log.close()
        assert alive(first)  # left running by the kill
        assert [r["state"] for r in runs(site)] == ["running"]
        serve = Serve(site, session=True)
        # The restart killed what was left of it before running it again (serve logged it before it
        # watched; the kill lands once the hook, at the lowest priority, gets the CPU).
        wait_for(lambda: not alive(first), 10, "the first run's process to be killed")
        run = ended(site, 1, timeout=60)[0]
        assert run["state"] == "ok" and run["restarts"] == 1 and run["tries"] == 2
        time.sleep(IDLE["series_idle"] + 3)
        starts = [r for r in records(log) if "start" in r]
        ends = [r for r in records(log) if "end" in r]
        assert len(starts) == 2 and len(ends) == 1 and ends[0]["pid"] == starts[1]["pid"]
        assert len(runs(site)) == 1
        assert "did not finish before serve stopped: it runs again" in serve.output()
    finally:
        assert serve.stop() == 0
        scp.stop()


@pytest.mark.dcmtk
def test_a_hook_running_when_serve_is_stopped_is_killed_and_runs_at_the_next_start(tmp_path, template_file):
    """supervisorctl restart: SIGTERM ends serve promptly; the run under way is killed with its
    group, goes back to waiting without counting as an interruption, and runs again."""
    template, log = recorder(tmp_path, "{series_number}")
    site = write_config(tmp_path / "site", **IDLE, on_series_complete=template)
    os.environ["HOOK_SLEEP"] = "60"
    try:
        scp, serve = Storescp(site), Serve(site)
    finally:
        del os.environ["HOOK_SLEEP"]
    try:
        storescu(port_of(site), volume(template_file, tmp_path / "a", 2), tmp_path)
        wait_for(lambda: records(log), 60, "the hook to start")
        first = records(log)[0]["pid"]
        stopping = time.monotonic()
        assert serve.stop() == 0
        assert time.monotonic() - stopping < hooks.KILL_GRACE + 5
        assert not alive(first)
        [run] = runs(site)
        assert run["state"] == "waiting" and run["restarts"] == 0 and run["pid"] is None
        serve = Serve(site)  # HOOK_SLEEP is not set now: the rerun ends at once
        run = ended(site, 1, timeout=60)[0]
        assert run["state"] == "ok" and run["restarts"] == 0 and run["tries"] == 2
        assert len([r for r in records(log) if "start" in r]) == 2
    finally:
        assert serve.stop() == 0
        scp.stop()


@pytest.mark.dcmtk
def test_fifty_series_at_once_never_run_more_than_hook_workers_hooks(tmp_path, template_file):
    template, log = recorder(tmp_path, "{series_number}")
    site = write_config(tmp_path / "site", **IDLE, on_series_complete=template, hook_workers=2)
    os.environ["HOOK_SLEEP"] = "0.3"
    try:
        scp, serve = Storescp(site), Serve(site)
    finally:
        del os.environ["HOOK_SLEEP"]
    try:
        files = []
        for number in range(1, 51):
            files += volume(template_file, tmp_path / str(number), 2, SeriesNumber=number)
        storescu(port_of(site), files, tmp_path)
        done = ended(site, 50, timeout=120)
        assert [r["state"] for r in done] == ["ok"] * 50
        events = sorted([(r["start"], 1) for r in records(log) if "start" in r]
                        + [(r["end"], -1) for r in records(log) if "end" in r])
        running, most = 0, 0
        for _, step in events:
            running += step
            most = max(most, running)
        assert most == 2, most  # two at once, never three
        assert sorted(int(r["argv"][0]) for r in records(log) if "argv" in r) == list(range(1, 51))
    finally:
        assert serve.stop() == 0
        scp.stop()


FLAKY = """\
import pathlib, sys
tries = pathlib.Path(sys.argv[1])
tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
print("try", len(tries.read_text()))
sys.exit(0 if len(tries.read_text()) >= 2 else 3)
"""


@pytest.mark.dcmtk
def test_a_failed_hook_is_tried_again_and_a_reopened_series_reruns_it(tmp_path, template_file):
    script, tries = tmp_path / "flaky.py", tmp_path / "tries"
    script.write_text(FLAKY)
    site = write_config(tmp_path / "site", **IDLE, hook_retries=1, hook_retry_wait=0.5, hook_when="always",
                        on_series_complete=f"{shlex.quote(sys.executable)} {script} {tries}")
    scp, serve = Storescp(site), Serve(site)
    try:
        files = volume(template_file, tmp_path / "a", 3)
        storescu(port_of(site), files[:2], tmp_path)
        run = ended(site, 1)[0]
        assert run["state"] == "ok" and run["tries"] == 2 and run["output"] == "try 2"
        assert "hook run 1 failed: exit status 3" in serve.output()
        storescu(port_of(site), files[2:], tmp_path)  # a late file: complete again, the hook runs again
        second = ended(site, 2)[1]
        assert second["state"] == "ok" and second["tries"] == 1 and tries.read_text() == "xxx"
    finally:
        assert serve.stop() == 0
        scp.stop()


@pytest.mark.dcmtk
def test_hook_rerun_no_runs_a_reopened_series_hook_once(tmp_path, template_file):
    template, log = recorder(tmp_path, "{series_number}")
    site = write_config(tmp_path / "site", **IDLE, on_series_complete=template, hook_rerun="no",
                        hook_when="always")
    scp, serve = Storescp(site), Serve(site)
    try:
        files = volume(template_file, tmp_path / "a", 3)
        storescu(port_of(site), files[:2], tmp_path)
        ended(site, 1)
        storescu(port_of(site), files[2:], tmp_path)
        second = ended(site, 2)[1]
        assert second["state"] == "skipped" and "hook_rerun = no" in second["reason"]
        assert len([r for r in records(log) if "start" in r]) == 1
    finally:
        assert serve.stop() == 0
        scp.stop()


@pytest.mark.dcmtk
def test_a_study_hook_runs_once_all_its_series_are_complete(tmp_path, template_file):
    template, log = recorder(tmp_path, "{study_dir} {series} {files} {verdict} {subject_label}")
    site = write_config(tmp_path / "site", **IDLE, on_study_complete=template)
    scp, serve = Storescp(site), Serve(site)
    try:
        study = generate_uid()
        files = []
        for number in (1, 2, 3):
            files += volume(template_file, tmp_path / str(number), 4, SeriesNumber=number, StudyInstanceUID=study,
                            StudyDate="20261201", PatientName="Doe^Jane")
        storescu(port_of(site), files, tmp_path)
        run = ended(site, 1)[0]
        assert run["state"] == "ok" and run["hook"] == "on_study_complete" and run["series_id"] is None
        (record,) = [r for r in records(log) if "argv" in r]
        folder = report(site)["studies"][0]["folder"]
        assert folder == "20261201-Doe_Jane"
        assert record["argv"] == [str(site.parent / "sorted" / folder), "3", "12", "whole", "20261201DoeJane"]
        assert record["env"]["DUMPWATCH_SUBJECT"] == folder and record["env"]["DUMPWATCH_EVENT"] == "study_complete"
    finally:
        assert serve.stop() == 0
        scp.stop()


def test_an_unknown_placeholder_is_a_configuration_error(tmp_path):
    site = write_config(tmp_path / "site", on_series_complete="dcm2niix -o {nifti_dir} {series_dir}",
                        on_study_complete="{study_dir}/convert")
    out = os.popen(f"{shlex.quote(sys.executable)} -m dumpwatch --config {site} check-config 2>&1").read()
    assert "on_series_complete: unknown placeholder {nifti_dir}" in out
    assert "on_study_complete: the program (the first word) must be written out" in out
    site = write_config(tmp_path / "other", hook_output_dir="/n/{study_date:%Y}/{subject!r}",
                        on_series_complete="dcm2niix -o {output_dir} {series_dir}")
    out = os.popen(f"{shlex.quote(sys.executable)} -m dumpwatch --config {site} check-config 2>&1").read()
    assert "hook_output_dir: {study_date}: a placeholder is a bare name" in out, out
    with pytest.raises(ValueError, match="the program .* is empty"):
        hooks.Template.parse("'' {series_dir}", hooks.SERIES_FIELDS)


def test_a_template_splits_once_and_values_never_make_arguments():
    template = hooks.Template.parse("prog -f %p_%s --name={series_description} '{series_dir}/x y' {{literal}}",
                                    hooks.SERIES_FIELDS)
    argv = template.fill({"series_description": "a b; c", "series_dir": "-rf /"})
    assert argv == ["prog", "-f", "%p_%s", "--name=a b; c", "_-rf //x y", "{literal}"]
    assert hooks.Template.parse("prog {series_dir}", hooks.SERIES_FIELDS).fill({"series_dir": "a\x00b"}) == \
        ["prog", "ab"]
    with pytest.raises(ValueError, match="unknown placeholder {series_dir}"):
        hooks.Template.parse("prog {series_dir}", hooks.FIELDS[hooks.STUDY])
    assert hooks.output_dir("/n/{subject}", {"subject": "../.."}) == Path("/n/.._..")
    assert hooks.output_dir("/n/{subject}", {"subject": ".."}) == Path("/n/_")


def test_the_shipped_dcm2niix_example_reads(tmp_path):
    from dumpwatch.config import read_config

    example = Path(__file__).parent.parent / "etc" / "dumpwatch-dcm2niix.cfg"
    cfg = read_config(example)
    assert cfg.on_series_complete is not None and cfg.on_series_complete.program == "dcm2niix"
    assert "output_dir" in cfg.on_series_complete.names() and cfg.hook_when == "whole"
    assert hooks.find_program("dcm2niix") is not None  # installed with the tests (PyPI's wheel)


def test_a_kill_leftover_kills_the_marked_and_never_a_process_that_reused_the_pid(tmp_path):
    import subprocess

    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    mark = f"{tmp_path}/journal.sqlite3#7"
    # A hook's child that left its group (setsid) still carries the run's mark.
    child = subprocess.Popen(["sleep", "30"], start_new_session=True, env={**os.environ, hooks.MARK: mark})
    near = subprocess.Popen(["sleep", "30"], start_new_session=True, env={**os.environ, hooks.MARK: mark + "0"})
    try:
        assert hooks.kill_leftover(other.pid, (hooks.start_time(other.pid) or 0) + 1, "no such mark") == 0
        assert other.poll() is None
        assert hooks.kill_leftover(other.pid, hooks.start_time(other.pid), "no such mark") == 1
        assert other.wait(timeout=10) == -signal.SIGKILL
        assert hooks.kill_leftover(None, None, mark) == 1
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert near.poll() is None  # another run's mark
    finally:
        for process in (other, child, near):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_hooks_run_at_the_lowest_cpu_and_io_priority(tmp_path):
    import threading

    seen = {}

    def start():
        hooks.lower_priority()
        probe = "cat /proc/self/stat; ionice -p $$ 2>/dev/null || echo no-ionice"
        ran = hooks.run(["sh", "-c", probe], dict(os.environ), str(tmp_path), 10, lambda pid, start: None)
        seen["output"] = ran.output

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    stat, io = seen["output"].splitlines()[:2]
    fields = stat.rsplit(")", 1)[1].split()  # from the state, field 3 of proc(5)
    assert fields[16] == "19"  # nice
    assert fields[38] == str(os.SCHED_IDLE)  # the scheduling policy: below any nice level
    assert io in ("idle", "no-ionice")


def test_a_fault_queueing_after_one_completion_never_fails_the_completions_transaction(tmp_path, caplog):
    """queue_after runs inside the transaction that records completions: a bug or an odd row
    there is logged and queues nothing for that completion; the others are queued."""
    from dumpwatch import actions, schema
    from dumpwatch.completion import Completion
    from dumpwatch.config import read_config
    from dumpwatch.journal import transaction

    site = write_config(tmp_path / "site", on_series_complete="dcm2niix -o /x {series_dir}")
    cfg = read_config(site)
    db = sqlite3.connect(tmp_path / "j.sqlite3", isolation_level=None)
    db.row_factory = sqlite3.Row
    schema.migrate(db, tmp_path / "j.sqlite3")
    db.execute("INSERT INTO studies (id, study_uid, folder) VALUES (1, '1.2', 's')")
    db.execute("INSERT INTO series (id, series_uid, study_id, folder) VALUES (5, '1.2.5', 1, 's/001-a')")
    missing = Completion("series", 99, "s/002-b", 1, False, row=1)  # no such series row: a fault
    present = Completion("series", 5, "s/001-a", 1, False, row=2)
    with transaction(db):
        db.execute("INSERT INTO marks (name, value) VALUES ('probe', '1')")
        actions.queue_after(cfg, db, [missing, present], time.time())
    assert [tuple(r) for r in db.execute("SELECT series_id, state FROM hook_runs")] == [(5, "waiting")]
    assert db.execute("SELECT value FROM marks WHERE name = 'probe'").fetchone()[0] == "1"  # committed
    assert "nothing queued after the completion of series s/002-b" in caplog.text
