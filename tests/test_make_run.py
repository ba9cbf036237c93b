"""The README's `make run`, for real: `make run 2>&1 | tee run.log` in a session of its own, as
a user types it in a terminal, with this test's configuration, folders and free port. However
it ends (Ctrl-C, tee ending, the terminal closing, SIGTERM to make, supervisord killed),
nothing of it is left running; a taken port and a second run are refused at once, with a
clear message."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from dcmtk import wait_for, write_config

from dumpwatch.config import read_config
from dumpwatch.dumplock import read_lock
from dumpwatch.status import listening

from helpers import tree_of

REPO = Path(__file__).resolve().parents[1]
READY = "Receiving on port"
START = 180  # seconds for `make run` to be ready: generous, for a slow, busy machine
GONE = 60  # seconds for everything to be gone once it is asked to end (it takes a few)

pytestmark = pytest.mark.dcmtk  # make run starts storescp (and installs DCMTK when missing)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """{pid: (start time, command)} of root and every process below it, now."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields:
                parents[int(entry)] = int(fields[1])
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        fields = proc_stat(pid)
        if fields:
            found[pid] = (fields[19], command_of(pid))
            todo += [child for child, parent in parents.items() if parent == pid]
    return found


def still_running(procs: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Those of procs that still run (the same pid, started at the same time)."""
    left = {}
    for pid, (start, command) in procs.items():
        fields = proc_stat(pid)
        if fields and fields[19] == start:
            left[pid] = command
    return left


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def make_command(cfg: Path, var: Path) -> list[str]:
    return ["make", "--no-print-directory", "-C", str(REPO), "run", f"RUN_CONFIG={cfg}", f"RUN_VAR={var}"]


def make_run_refused(cfg: Path, var: Path) -> tuple[int, str, str]:
    """A `make run` expected to stop at once: its exit status, output, error output. Should it
    run on instead, it is ended with all it started when the wait is over."""
    process = subprocess.Popen(make_command(cfg, var), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in still_running(descendants(process.pid)):
            os.kill(pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"make run went on instead of stopping: {out} {err}")
    return process.returncode, out, err


class MakeRun:
    """`make run 2>&1 | tee run.log` in a session of its own: a terminal's foreground job."""

    def __init__(self, cfg: Path, var: Path):
        self.cfg, self.var = cfg, var
        self.port, self.web_port = read_config(cfg).port, read_config(cfg).web_port
        self.dump = cfg.parent / "dump"
        self.log = cfg.parent / "run.log"
        pipeline = f"{shlex.join(make_command(cfg, var))} 2>&1 | tee {shlex.quote(str(self.log))}"
        self.terminal = open(cfg.parent / "terminal.txt", "wb")
        # bash without job control runs the pipeline in its own process group: the session's.
        self.shell = subprocess.Popen(["bash", "-c", pipeline], stdin=subprocess.DEVNULL, stdout=self.terminal,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.procs: dict[int, tuple[str, str]] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def supervisord_log(self) -> str:
        path = self.var / "supervisord.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """supervisord's log, and serve's if it has a file of its own: for a failure's message."""
        serve = self.cfg.parent / "serve.log"
        own = f"\n--- {serve}:\n{serve.read_text(errors='replace')}" if serve.exists() else ""
        return self.supervisord_log() + own

    def wait_ready(self) -> None:
        wait_for(lambda: READY in self.output() or self.shell.poll() is not None, START, "make run to be ready")
        assert READY in self.output(), self.output()
        # What it says is so: storescp listens, serve watches the dump.
        wait_for(lambda: listening(self.port) and read_lock(self.dump) and listening(self.web_port), 30,
                 "storescp, serve and the status page")
        self.procs = descendants(self.shell.pid)
        commands = [command for _, command in self.procs.values()]
        for program in ("make ", "tee ", "/supervisord ", "storescp --fork", " serve", " web"):
            assert any(program in command for command in commands), (program, commands)

    def pid_of(self, word: str) -> int:
        [pid] = [pid for pid, (_, command) in self.procs.items() if command.startswith(f"{word} ")]
        return pid

    @property
    def supervisord(self) -> int:
        return int((self.var / "supervisord.pid").read_text())

    def assert_all_gone(self) -> float:
        """Everything it started has ended and the port is free; how long that took."""
        started = time.monotonic()
        wait_for(lambda: not still_running(self.procs) and not listening(self.port) and not listening(self.web_port),
                 GONE,
                 f"everything of make run to end: {still_running(self.procs)}")
        self.shell.wait(timeout=GONE)
        assert port_free(self.port)
        assert read_lock(self.dump) is None
        return time.monotonic() - started

    def clean_up(self) -> None:
        """After a failure too: nothing of this run may outlive the test."""
        leftovers = {**descendants(self.shell.pid), **self.procs}
        for pid in still_running(leftovers):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.shell.wait(timeout=30)
        finally:
            self.terminal.close()


@pytest.fixture
def make_run(tmp_path):
    """Start `make run` for a configuration of this test's own (a free port, one worker)."""
    runs: list[MakeRun] = []

    def start(cfg: Path | None = None, var: Path | None = None) -> MakeRun:
        # serve's own log in a file too: what it said is kept after the terminal's reader is gone
        cfg = cfg or write_config(tmp_path / "site", workers=1, fname_log=tmp_path / "site" / "serve.log")
        run = MakeRun(cfg, var or tmp_path / "var")
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.clean_up()


def test_make_run_receives_refuses_a_second_run_and_ends_on_ctrl_c(make_run, tmp_path):
    run = make_run()
    run.wait_ready()
    assert " CRIT " not in run.supervisord_log(), run.supervisord_log()  # started quietly, as root too

    # A second make run on the same configuration and folders: refused, saying how to stop the first.
    runner = int((run.var / "run.pid").read_text())
    code, out, err = make_run_refused(run.cfg, run.var)
    assert code != 0
    assert (f"dumpwatch is already running: `make run` (pid {runner}) started it, with its files in {run.var}.\n"
            f"Stop it with Ctrl-C in its terminal, or with: kill {runner}\n") in err, err
    assert READY not in out + err
    # The same configuration with other folders for supervisord: its serve is on the same dump.
    code, out, err = make_run_refused(run.cfg, tmp_path / "var2")
    assert code != 0
    assert f"dumpwatch serve is already running on this configuration's dump {run.dump} (pid " in err, err
    assert f"or: kill {run.supervisord} (its supervisord)" in err, err
    assert not (tmp_path / "var2" / "supervisord.log").exists()

    # The storescu line it prints works as the user pastes it.
    line = next(line for line in run.output().splitlines() if "storescu -aec" in line)
    command = shlex.split(line)
    assert command[:5] == ["TCP_NODELAY=1", "storescu", "-aec", "DUMPWATCH", "127.0.0.1"], line
    subprocess.run(command[1:], env={**os.environ, "TCP_NODELAY": "1"}, check=True, timeout=120)
    sorted_tree = run.cfg.parent / "sorted"
    wait_for(lambda: sorted_tree.exists() and tree_of(sorted_tree), 60, "the example sorted")
    assert list(tree_of(sorted_tree)) == ["20040826-CompressedSamples_MR1/001-NoSeriesDescription/0001.dcm"]
    # The status page it names shows the study.
    assert f"on the status page: http://127.0.0.1:{run.web_port}/ (metrics at /metrics)" in run.output()
    def page() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{run.web_port}/", timeout=30) as answer:
            return answer.read()

    # (serve counts a file into its series soon after it is placed; the page's report is 5 s old at most)
    wait_for(lambda: b"<h3>20040826-CompressedSamples_MR1</h3>" in page(), 60, "the study on the status page")

    os.killpg(run.shell.pid, signal.SIGINT)  # Ctrl-C: to the terminal's foreground process group
    took = run.assert_all_gone()
    print(f"Ctrl-C: all gone in {took:.1f} s")
    assert "stopped: dumpwatch (exit status 0)" in run.supervisord_log(), run.logs()
    assert "stopped: storescp (terminated by SIGTERM)" in run.supervisord_log(), run.supervisord_log()
    assert "stopped: web (exit status 0)" in run.supervisord_log(), run.supervisord_log()


@pytest.mark.parametrize("ending", ["tee ends", "the terminal closes", "make gets SIGTERM", "supervisord is killed"])
def test_nothing_is_left_running_however_make_run_ends(make_run, ending):
    run = make_run()
    run.wait_ready()
    if ending == "tee ends":  # the pipe closes: make run's output has no reader any more
        os.kill(run.pid_of("tee"), signal.SIGTERM)
    elif ending == "the terminal closes":  # SIGHUP to its foreground process group
        os.killpg(run.shell.pid, signal.SIGHUP)
    elif ending == "make gets SIGTERM":
        os.kill(run.pid_of("make"), signal.SIGTERM)
    else:
        os.kill(run.supervisord, signal.SIGKILL)
    took = run.assert_all_gone()
    print(f"{ending}: all gone in {took:.1f} s")
    if ending == "supervisord is killed":  # nothing could stop them but make run itself
        assert "supervisord ended unexpectedly (killed by SIGKILL)" in run.output(), run.output()
    else:  # supervisord stopped both as on a server: serve finished cleanly
        assert "stopped: dumpwatch (exit status 0)" in run.supervisord_log(), run.logs()
    if ending == "make gets SIGTERM":
        assert "make run: stopped; nothing of it is left running" in run.output(), run.output()


def test_a_taken_port_stops_make_run_at_once_with_a_clear_message(tmp_path):
    cfg = write_config(tmp_path / "site", workers=1)
    port = read_config(cfg).port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        started = time.monotonic()
        code, out, err = make_run_refused(cfg, tmp_path / "var")
        took = time.monotonic() - started
    print(f"taken port: refused in {took:.1f} s")
    assert code != 0
    assert f"dumpwatch cannot receive on port {port}: another program holds it: " in err, err
    assert f"(pid {os.getpid()})." in err, err  # this test's process holds it
    assert f"Stop that program, or set another port in {cfg} (port = ...)." in err, err
    assert READY not in out + err
    # Nothing was started: supervisord never ran, nor serve.
    assert not (tmp_path / "var" / "supervisord.log").exists()
    assert read_lock(cfg.parent / "dump") is None
    # The status page's port taken: refused as clearly, naming its key.
    web_port = read_config(cfg).web_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", web_port))
        squatter.listen()
        code, out, err = make_run_refused(cfg, tmp_path / "var")
    assert code != 0
    assert f"dumpwatch cannot serve the status page on port {web_port}: another program holds it: " in err, err
    assert f"set another port in {cfg} (web_port = ...)." in err, err
    assert not (tmp_path / "var" / "supervisord.log").exists()
