"""The real receiver for end-to-end tests: storescp started by scripts/storescp.sh, storescu
sending over loopback, `dumpwatch serve` as its own process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from dumpwatch.dumplock import read_lock
from dumpwatch.send import Item, read_item, write_profile
from dumpwatch.status import listening

REPO = Path(__file__).resolve().parents[1]


def dcmtk_missing() -> str:
    """Why a test marked `dcmtk` cannot run here (conftest.py skips it, saying so), or "".

    Every test that starts storescp, storescu or echoscu (directly, or through `dumpwatch send`,
    `status` against a listening port, supervisord or `make run`) carries @pytest.mark.dcmtk,
    so that `pytest -m "not dcmtk"` runs the rest on a machine without DCMTK.
    """
    if shutil.which("storescp") is None or shutil.which("storescu") is None:
        return "DCMTK's storescp and storescu are not installed (apt-get install dcmtk)"
    return ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "") -> object:
    """Poll until predicate() is true; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.05)


def write_config(folder: Path, **extra: object) -> Path:
    """A site's configuration in folder: dump, sorted tree and quarantine beside it, free ports."""
    lines = {"port": free_port(), "web_port": free_port(), "AETitle": "DUMPWATCH", "dir_dump": "dump",
             "dir_out": "sorted", "dir_quarantine": "quarantine", "incomplete_timeout": 3, "workers": 2, **extra}
    path = folder / "dumpwatch.cfg"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {value}\n" for key, value in lines.items()))
    return path


def config_value(cfg: Path, key: str) -> str:
    return subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(cfg), "config-value", key],
                          capture_output=True, text=True, check=True).stdout.strip()


class Storescp:
    """scripts/storescp.sh with the site's configuration, in its own process group."""

    def __init__(self, cfg: Path):
        self.cfg = cfg
        self.port = int(config_value(cfg, "port"))
        env = {**os.environ, "DUMPWATCH": str(Path(sys.executable).parent / "dumpwatch")}
        self.log = open(cfg.parent / "storescp.log", "ab")
        self.process = subprocess.Popen([str(REPO / "scripts" / "storescp.sh"), str(cfg)], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: listening(self.port) or self.process.poll() is not None, 20, "storescp to listen")
        assert self.process.poll() is None, (cfg.parent / "storescp.log").read_text()

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Signal storescp and the children it forked for associations."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
        self.log.close()


class Serve:
    """`dumpwatch serve` as its own process, ready once it holds the dump's lock."""

    def __init__(self, cfg: Path, wait: bool = True, user: int | None = None, group: int | None = None,
                 session: bool = False, prefix: tuple[str, ...] = ()):
        """user, group: run as them (the test runs as root); session: in a process group of its
        own, as a supervisor starts it, so that a signal can reach serve and its workers;
        prefix: a command serve runs under (prlimit, for a memory limit)."""
        self.cfg = cfg
        self.dump = Path(config_value(cfg, "dir_dump"))
        self.log = open(cfg.parent / "serve.log", "ab")
        extra = {} if user is None else {"user": user, "group": group, "extra_groups": []}
        self.process = subprocess.Popen([*prefix, sys.executable, "-m", "dumpwatch", "--config", str(cfg), "serve"],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=session,
                                        cwd=cfg.parent, env={**os.environ, "PYTHONPATH": str(REPO)}, **extra)
        log_file = config_value(cfg, "fname_log") if "fname_log" in cfg.read_text() else ""
        self.log_file = Path(log_file) if log_file else None
        if wait:  # it holds the lock, and its watcher runs
            wait_for(lambda: (self._holds_lock() and "watching " in self.output()) or self.process.poll() is not None,
                     30, "serve to start")
            assert self.process.poll() is None, self.output()

    def _holds_lock(self) -> bool:
        holder = read_lock(self.dump) if self.dump.exists() else None
        return holder is not None and holder.pid == self.process.pid

    def output(self) -> str:
        """What serve printed, and what it wrote to its log file if it has one."""
        if not self.log.closed:
            self.log.flush()
        text = (self.cfg.parent / "serve.log").read_text(errors="replace")
        if self.log_file is not None and self.log_file.exists():
            text += self.log_file.read_text(errors="replace")
        return text

    def stop(self) -> int:
        """SIGTERM, as a supervisor stops it; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


def storescu_config(files: Iterable[Path], path: Path) -> Path:
    """The association profile `dumpwatch send` gives storescu: each file's SOP class in its
    transfer syntax (storescu refuses SOP classes it does not know, such as Siemens' private
    CSA non-image storage, unless a profile names them)."""
    items = [read_item(str(file)) for file in files]
    unsendable = [found for found in items if not isinstance(found, Item)]
    assert not unsendable, unsendable
    return write_profile(items, path)


def storescu(port: int, files: list[Path], work: Path, wait: bool = True,
             profile: Path | None = None, aet: str = "SCANNER") -> subprocess.Popen:
    """Send files to 127.0.0.1:port as a scanner would (one association), as calling AE
    title aet. profile: one storescu_config() made for these files before (it reads every file)."""
    if profile is None:
        profile = storescu_config(files, work / f"storescu-{os.getpid()}-{time.monotonic_ns()}.cfg")
    command = ["storescu", "-xf", str(profile), "Default", "-aec", "DUMPWATCH", "-aet", aet,
               "127.0.0.1", str(port), *map(str, files)]
    process = subprocess.Popen(command, env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
    return process


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".json", ".md", ".txt"))
