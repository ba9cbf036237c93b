"""Permissions and vanishing paths while serve runs: a clear message, no crash loop, nothing lost."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from dcmtk import Serve, Storescp, wait_for, write_config

from helpers import make_dicom, run_process, tree_of


def dump_files(dump: Path) -> list[str]:
    return sorted(name for name in os.listdir(dump) if name != ".dumpwatch.lock")


@pytest.fixture
def shared_base():
    """A folder nobody may use: serve runs as nobody, so that permissions bind it (root's do not)."""
    if os.getuid() != 0:
        pytest.skip("needs root to run serve as another user")
    base = Path(tempfile.mkdtemp(prefix="dumpwatch-paths-"))  # tmp_path is root's alone
    os.chmod(base, 0o755)
    yield base, pwd.getpwnam("nobody")
    shutil.rmtree(base)


def _arrive(path: Path, dump: Path, owner) -> None:
    """A finished file lands in the dump, as storescp (running as nobody too) leaves it."""
    os.chown(path, owner.pw_uid, owner.pw_gid)
    os.rename(path, dump / path.name)
    os.utime(dump / path.name)


@pytest.mark.parametrize("blocked", ["dir_out", "subject folder"])
def test_a_folder_serve_cannot_write_leaves_files_waiting_until_it_can(shared_base, template_file, blocked):
    base, nobody = shared_base
    cfg = write_config(base, sweep_interval=1)
    for name in ("dump", "sorted", "quarantine", "sorted/.dumpwatch"):
        (base / name).mkdir()
        os.chown(base / name, nobody.pw_uid, nobody.pw_gid)
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    os.chown(cfg, nobody.pw_uid, nobody.pw_gid)
    # root's, not writable by nobody: the whole tree, or one subject's folder in it
    locked = base / "sorted" if blocked == "dir_out" else base / "sorted" / "20210715-phantom"
    locked.mkdir(exist_ok=True)
    os.chown(locked, 0, 0)
    os.chmod(locked, 0o755)
    serve = Serve(cfg, user=nobody.pw_uid, group=nobody.pw_gid)
    try:
        _arrive(make_dicom(base / "MR.phantom", template_file), base / "dump", nobody)
        _arrive(make_dicom(base / "MR.other", template_file, PatientName="Other^Subject"), base / "dump", nobody)
        wait_for(lambda: "Permission denied" in serve.output(), 30, "the problem reported")
        if blocked == "subject folder":  # the other subject's file is not held up
            wait_for(lambda: dump_files(base / "dump") == ["MR.phantom"], 30, "the other file sorted")
        time.sleep(3)  # sweeps every second meanwhile: tried again, never a crash
        assert serve.process.poll() is None, serve.output()
        assert "MR.phantom" in dump_files(base / "dump")  # left where it was: nothing lost
        # What it said while the folder refused (a try at the moment of the fix may find the
        # folder writable again by the time it looks for the one that refused).
        said = serve.output()
        os.chown(locked, nobody.pw_uid, nobody.pw_gid)  # the IT person fixes the folder
        wait_for(lambda: dump_files(base / "dump") == [], 60, "both files sorted once it can")
        assert sorted(tree_of(base / "sorted")) == ["20210715-Other_Subject/002-gre_field_magph/0001.dcm",
                                                    "20210715-phantom/002-gre_field_magph/0001.dcm"]
        assert not os.listdir(base / "quarantine")
    finally:
        assert serve.stop() == 0, serve.output()
    lines = [line for line in said.splitlines() if "Permission denied" in line]
    assert lines and all(f"(user nobody may not write in {locked})" in line for line in lines), lines
    assert all("MR.phantom" in line or blocked == "dir_out" for line in lines), lines


@pytest.mark.parametrize("blocked", ["dump", "unreadable subject folder", "quarantine"])
def test_a_refusal_names_the_folder_that_refused(shared_base, template_file, blocked):
    """"cannot place it: Permission denied" named no folder when the refusal came from the
    dump (a move takes the file out of it), or from a tree folder serve may not read, and a
    quarantine that refused named none either: the tree's folders are opened by fd, so the
    error names no folder; the reason must find it."""
    base, nobody = shared_base
    cfg = _site_of(base, nobody, sweep_interval=1)
    dump = base / "dump"
    if blocked == "dump":
        (dump / ".dumpwatch.lock").touch()  # serve's own, made before the dump was handed to root
        os.chown(dump / ".dumpwatch.lock", nobody.pw_uid, nobody.pw_gid)
        locked, expected = dump, f"cannot place it: Permission denied (user nobody may not write in {dump})"
    elif blocked == "unreadable subject folder":
        locked = base / "sorted" / "20210715-phantom"
        locked.mkdir()
        expected = f"cannot place it: Permission denied (user nobody may not read {locked})"
    else:
        locked = base / "quarantine"
        expected = ("cannot quarantine it (not a DICOM file (no 'DICM' marker at byte 128)): Permission denied "
                    f"(user nobody may not write in {locked})")
    os.chown(locked, 0, 0)
    os.chmod(locked, 0o700 if blocked == "unreadable subject folder" else 0o755)
    serve = Serve(cfg, user=nobody.pw_uid, group=nobody.pw_gid)
    try:
        path = make_dicom(base / "MR.1", template_file)
        if blocked == "quarantine":
            path.write_bytes(b"not DICOM " * 100)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        os.rename(path, dump / "MR.1")
        os.utime(dump / "MR.1")  # no event: the next sweep finds it
        wait_for(lambda: "in place: " in serve.output() or "not placed at " in serve.output(), 30, "the refusal")
    finally:
        assert serve.stop() == 0, serve.output()
    lines = [line for line in serve.output().splitlines() if "Permission denied" in line]
    assert lines and all(line.endswith(expected) for line in lines), lines


@pytest.mark.dcmtk
def test_status_says_why_files_wait_and_alarms_when_they_keep_failing(shared_base, template_file):
    """Files left in the dump for a reason that does not heal (here: serve may not take files
    out of the dump) were only a count in status, healthy until backlog_alarm (5 minutes).
    serve now tells status why; a file left 3 times for the same reason is a problem."""
    base, nobody = shared_base
    cfg = _site_of(base, nobody)
    dump = base / "dump"
    (dump / ".dumpwatch.lock").touch()  # serve's own, made before the dump was handed to root
    os.chown(dump / ".dumpwatch.lock", nobody.pw_uid, nobody.pw_gid)
    os.chown(dump, 0, 0)  # root's storescp writes it; serve, as nobody, may read but not move

    def status() -> tuple[int, dict, str]:
        result = run_process("--config", str(cfg), "status", "--json")
        text = run_process("--config", str(cfg), "status").stdout
        return result.returncode, json.loads(result.stdout), text

    scp = Storescp(cfg)
    serve = Serve(cfg, user=nobody.pw_uid, group=nobody.pw_gid)
    try:
        assert status()[0] == 0
        make_dicom(dump / "MR.1", template_file)  # closed in the dump: an event
        wait_for(lambda: status()[0] == 1, 60, "the alarm")
        code, report, text = status()
        [problem] = report["problems"]
        assert re.fullmatch(r"1 file in the dump cannot be sorted \(tried \d+ times\): "
                            r"cannot place it: Permission denied.*", problem), problem
        [left] = report["dump"]["left"]
        assert left["files"] == 1 and left["tries"] >= 3, left
        assert left["reason"].startswith("cannot place it: Permission denied"), left
        assert report["dump"]["oldest_seconds"] < 300  # before backlog_alarm
        assert re.search(r"1 file left \d+ times: cannot place it: Permission denied", text), text
        os.chown(dump, nobody.pw_uid, nobody.pw_gid)  # the IT person fixes the folder
        wait_for(lambda: dump_files(dump) == [], 60, "the file sorted once it can")
        code, report, _ = status()
        assert code == 0 and report["dump"]["left"] == [], report
    finally:
        assert serve.stop() == 0, serve.output()
        scp.stop()


def test_the_dump_removed_and_made_again_under_serve(tmp_path, template_file):
    """rm -rf of the dump and a new one in its place (a careless clean-up): inotify watched the
    old folder, so serve exits for the supervisor; started again, it sorts what the new holds."""
    cfg = write_config(tmp_path / "site")
    serve = Serve(cfg)
    dump = tmp_path / "site" / "dump"
    shutil.rmtree(dump)
    dump.mkdir()
    make_dicom(dump / "MR.new", template_file)
    assert serve.process.wait(timeout=30) == 1
    serve.log.close()
    assert "was removed or replaced; starting again makes it anew" in serve.output()
    again = Serve(cfg)
    try:
        wait_for(lambda: dump_files(dump) == [], 30, "the new dump's file sorted")
        assert list(tree_of(tmp_path / "site" / "sorted")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
    finally:
        assert again.stop() == 0


@pytest.mark.parametrize("how", ["moved away", "removed and made again"])
def test_the_sorted_tree_replaced_under_serve(tmp_path, template_file, how):
    """`mv sorted archive; mkdir sorted`, or `rm -rf sorted; mkdir sorted`: serve held the old
    folder open, and went on writing into the archive (status: healthy, 0 sorted), or failed
    every file with "No such file or directory". It exits for the supervisor instead; the
    files wait in the dump, and the restart sorts them into the new tree."""
    cfg = write_config(tmp_path / "site")
    site = tmp_path / "site"
    serve = Serve(cfg)
    make_dicom(site / "dump" / "MR.1", template_file, InstanceNumber=1)  # closed in the dump: an event
    try:
        wait_for(lambda: dump_files(site / "dump") == [], 30, "the first file sorted")
        if how == "moved away":
            os.rename(site / "sorted", site / "archive")
        else:
            shutil.rmtree(site / "sorted")
        (site / "sorted").mkdir()
        make_dicom(site / "dump" / "MR.2", template_file, InstanceNumber=2)
        wait_for(lambda: serve.process.poll() is not None, 30, "serve to exit")
    finally:
        serve.stop()
    assert serve.process.returncode == 1, serve.output()
    assert f"the sorted tree {site / 'sorted'} was moved, removed or replaced" in serve.output()
    assert "Traceback" not in serve.output()
    assert dump_files(site / "dump") == ["MR.2"]  # it waits: nothing lost
    if how == "moved away":
        assert list(tree_of(site / "archive")) == ["20210715-phantom/002-gre_field_magph/0001.dcm"]
    again = Serve(cfg)  # as the supervisor restarts it
    try:
        wait_for(lambda: dump_files(site / "dump") == [], 30, "the waiting file sorted into the new tree")
        assert list(tree_of(site / "sorted")) == ["20210715-phantom/002-gre_field_magph/0002.dcm"]
    finally:
        assert again.stop() == 0, again.output()


def test_files_deleted_between_their_event_and_their_read(tmp_path, template_file):
    """Someone tidies the dump while files arrive: each deleted file is simply gone, the rest
    are sorted, and serve goes on."""
    cfg = write_config(tmp_path / "site")
    serve = Serve(cfg)
    dump = tmp_path / "site" / "dump"
    source = tmp_path / "made"
    for number in range(1, 201):
        make_dicom(source / f"MR.{number}", template_file, InstanceNumber=number)
    kept = set()
    try:
        for number in range(1, 201):
            data = (source / f"MR.{number}").read_bytes()
            with open(dump / f"MR.{number}", "wb") as writer:
                writer.write(data)  # closed: the event is queued
            if number % 2:
                os.unlink(dump / f"MR.{number}")  # at once, most often before serve reads it
            else:
                kept.add(f"20210715-phantom/002-gre_field_magph/{number:04d}.dcm")
        wait_for(lambda: dump_files(dump) == [], 30, "the kept files sorted")
        assert serve.process.poll() is None, serve.output()
        assert set(tree_of(tmp_path / "site" / "sorted")) == kept
        assert not (tmp_path / "site" / "quarantine").exists() or not os.listdir(tmp_path / "site" / "quarantine")
    finally:
        assert serve.stop() == 0, serve.output()
    assert "Traceback" not in serve.output()


def _site_of(base, nobody, **extra):
    """A site whose dump, tree, quarantine and configuration belong to nobody."""
    cfg = write_config(base, **extra)
    for name in ("dump", "sorted", "quarantine"):
        (base / name).mkdir()
        os.chown(base / name, nobody.pw_uid, nobody.pw_gid)
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    os.chown(cfg, nobody.pw_uid, nobody.pw_gid)
    return cfg
