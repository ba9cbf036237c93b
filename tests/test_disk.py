"""Disk watermarks on a real, small filesystem: a 32 MiB tmpfs in a mount namespace of its own
(tests/fill_disk.py), filled with fallocate. status warns (exit 3) past disk_warn, is
unhealthy (exit 1) past disk_alarm, healthy (exit 0) once there is room again; the page says
the same; the forecast is the last day's bytes; nothing in the tree is deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, TESTDATA

pytestmark = pytest.mark.dcmtk


def namespace() -> list[str]:
    """A mount namespace of our own: as root plainly, else as root of a user namespace."""
    command = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        command.insert(1, "--map-root-user")
    if subprocess.run([*command, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here (unshare --mount), so no tmpfs to fill")
    return command


def test_status_and_page_warn_then_turn_unhealthy_as_the_disk_fills(tmp_path):
    done = subprocess.run([*namespace(), sys.executable, str(REPO / "tests" / "fill_disk.py"), str(tmp_path),
                           str(TESTDATA / "ge")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    received, warned, alarmed, freed = json.loads(done.stdout.splitlines()[-1])

    [fs] = received["status"]["disk"]  # one filesystem holds the tree, the quarantine and the dump
    assert fs["roles"] == ["sorted tree", "quarantine", "dump"] and fs["size"] == 32 << 20
    assert fs["rate"] == received["kept"] > 0  # the bytes sorted in the last day
    assert fs["hours_left"] == pytest.approx(fs["free"] * 24 / received["kept"], rel=0.01)
    assert received["exit"] == 0 and received["status"]["healthy"] and not received["status"]["warnings"]
    assert received["verdict"] == "Healthy"

    assert warned["exit"] == 3 and warned["status"]["healthy"], warned["status"]
    [warning] = warned["status"]["warnings"]
    assert "the filesystem of the sorted tree and quarantine and dump is 88% full (warning at 85%)" in warning
    assert warned["status"]["disk"][0]["level"] == "warn"
    assert warned["verdict"] == "Healthy, with a warning"

    assert alarmed["exit"] == 1 and not alarmed["status"]["healthy"]
    [problem] = alarmed["status"]["problems"]
    assert "is 97% full (alarm at 95%)" in problem and "dumpwatch deletes nothing to make room" in problem
    assert alarmed["verdict"] == "UNHEALTHY"

    assert freed["exit"] == 0 and freed["verdict"] == "Healthy"
    assert received["tree_files"] == warned["tree_files"] == alarmed["tree_files"] == freed["tree_files"] == \
        received["sent"] == 6
