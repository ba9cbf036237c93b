"""Shared fixtures: the real scanner files of tests/data, real folders in tmp_path. Fixtures only:
what tests import is in helpers.py (pytest advises against importing conftest)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from helpers import FIELDMAP, TESTDATA, copy_testdata


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes the receiver fixture starts storescp: it is marked dcmtk, as every test
    that starts a DCMTK program is. Where DCMTK is missing, marked tests skip with the reason."""
    from dcmtk import dcmtk_missing

    missing = dcmtk_missing()
    no_browser = None if shutil.which("chromium") and shutil.which("chromedriver") else \
        "chromium or chromedriver is missing (as root: apt-get install chromium chromium-driver)"
    for item in items:
        if "receiver" in item.fixturenames:
            item.add_marker(pytest.mark.dcmtk)
        if missing and item.get_closest_marker("dcmtk"):
            item.add_marker(pytest.mark.skip(reason=missing))
        if no_browser and item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.skip(reason=no_browser))


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not (TESTDATA / "expected.json").is_file():
        pytest.fail(f"the real scanner files are missing: expected them in {TESTDATA} "
                    "(tests/data of the repository, or the folder DUMPWATCH_TESTDATA names)")
    return TESTDATA


@pytest.fixture(scope="session")
def expected(testdata: Path) -> dict:
    return json.loads((testdata / "expected.json").read_text())["files"]


@pytest.fixture
def dump(tmp_path: Path, testdata: Path) -> Path:
    """A dump folder holding a copy of every real scanner file (sort-once moves its input)."""
    folder = tmp_path / "dump"
    copy_testdata(testdata, folder)
    return folder


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def template_file(testdata: Path) -> Path:
    """One real Siemens image to build synthetic files from."""
    return testdata / FIELDMAP / "e1_01.dcm"


@pytest.fixture(autouse=True)
def no_thread_leaks():
    """A test must not leave threads running (as watchdog's own tests check)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def site(tmp_path):
    """A site's configuration (tests/dcmtk.py write_config): dump, tree, quarantine, a free port."""
    from dcmtk import write_config

    return write_config(tmp_path / "site")


@pytest.fixture
def receiver(site):
    """storescp and serve running for the site; stopped cleanly (serve exits 0) after."""
    from dcmtk import Serve, Storescp

    scp = Storescp(site)
    serve = Serve(site)
    yield scp, serve
    code = serve.stop()
    scp.stop()
    assert code == 0, serve.output()
