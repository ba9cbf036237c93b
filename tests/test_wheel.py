"""dumpwatch as a user installs it without the checkout: a wheel in a fresh venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from helpers import REPO, tree_of


def _run(args: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DUMPWATCH_CONFIG")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv outside the checkout with dumpwatch installed from a wheel built from it."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: building writes build/ and *.egg-info into the tree it builds
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".hypothesis", "var", "out"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", work / "dist", source],
                 cwd=work)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((work / "dist").glob("dumpwatch-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", venv], cwd=work)
    assert made.returncode == 0, made.stderr
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on
    pip = _run([venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", wheels[0]], cwd=work)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv


def test_a_wheel_installed_in_a_fresh_venv_anonymises_with_the_shipped_profile(installed, tmp_path, template_file):
    code = "import dumpwatch.rules as r; print(r.__file__); print(r.RULES_DIR)"
    where = _run([installed / "bin" / "python", "-c", code], cwd=tmp_path)
    module, layers = where.stdout.split()
    assert module.startswith(str(installed)) and layers.startswith(str(installed)), where.stdout + where.stderr
    assert (Path(layers) / "basic.toml").is_file()

    dump = tmp_path / "dump"
    dump.mkdir()
    shutil.copyfile(template_file, dump / "MR.1")
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text(f"dir_out = {tmp_path / 'out'}\ndir_quarantine = {tmp_path / 'q'}\nanon_profile = basic\n")
    checked = _run([installed / "bin" / "dumpwatch", "--config", cfg, "check-rules"], cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "basic.toml" in checked.stdout
    result = _run([installed / "bin" / "dumpwatch", "--config", cfg, "sort-once", dump], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    placed = tree_of(tmp_path / "out")
    assert len(placed) == 1, placed
    original, anonymised = dcmread(template_file), dcmread(tmp_path / "out" / next(iter(placed)))
    assert anonymised.SOPInstanceUID != original.SOPInstanceUID  # the Basic Profile replaces UIDs
    assert str(anonymised.PatientName) != str(original.PatientName) or not str(original.PatientName)
    assert "PatientBirthDate" not in anonymised or anonymised.PatientBirthDate != original.PatientBirthDate
    assert not os.listdir(dump)
