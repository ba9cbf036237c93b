"""`make run`: storescp and `dumpwatch serve` under supervisord, in the foreground, and none
of them left running however it ends.

    .venv/bin/python scripts/run.py CONFIG VAR

Before anything starts: is one already running (for these folders, or on this dump), and is
the port free? If not, it says so and exits 1. Then supervisord (etc/supervisord.conf) runs
as this program's child, in a process group of its own, and its output is passed on here.

Why a program between make and supervisord: under `make run 2>&1 | tee run.log`, Ctrl-C ended
tee at once, and supervisord's next line (for the very signal) went to a closed pipe. It
reports that error on stderr, the same closed pipe, and the second error ends supervisord
without stopping its programs: they run in process groups of their own, so the Ctrl-C had not
reached them either, and storescp and serve stayed behind with the port. Here:

- supervisord writes only to this program, which reads to the end whatever becomes of its own
  output;
- Ctrl-C, SIGTERM, SIGHUP (the terminal closing), this program's output closing (tee ended)
  and make dying (a parent-death signal) all stop supervisord with SIGTERM, which stops both
  programs as it does on a server;
- this program is a child subreaper: whatever supervisord leaves behind (killed, it cannot stop
  its programs) comes to it instead of to init, and it ends them before it exits;
- supervisord dies with this program (a parent-death signal), and storescp and serve die with
  supervisord (`setpriv --pdeathsig` in etc/supervisord.conf), should this program be killed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dumpwatch.config import load_config
from dumpwatch.dumplock import read_lock
from dumpwatch.errors import ConfigError
from dumpwatch.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl
from dumpwatch.status import listening
from dumpwatch.web import check_web

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's: supervisord and dumpwatch are beside it
SUPERVISORD_CONF = REPO / "etc" / "supervisord.conf"
RUN_LOCK = "run.pid"  # in VAR: held by the running `make run`, with its pid

STOP_WAIT = 60  # seconds supervisord has to stop both (serve may finish a file: stopwaitsecs = 30)
ORPHAN_WAIT = 20  # seconds what supervisord left has to end after SIGTERM, before SIGKILL
_FATAL = re.compile(rb"gave up: (\S+) entered FATAL state")

def say(text: str) -> None:
    """A line of our own on stderr (which may be a closed pipe by now)."""
    try:
        os.write(2, f"{text}\n".encode(errors="backslashreplace"))
    except OSError:
        pass


def command_of(pid: int) -> str:
    """A process's command line, short and printable, or '' if it is gone or hidden."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    text = " ".join(os.path.basename(argv[0].decode(errors="replace")) if n == 0 else a.decode(errors="replace")
                    for n, a in enumerate(argv))
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 80 else text[:77] + "..."


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold anything): state, parent, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def children_of(pid: int) -> list[int]:
    """The living children of pid (not those that have ended and wait to be collected)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                kids.append(int(entry))
    return kids


def port_holders(port: int) -> list[int]:
    """The processes with a socket listening on this TCP port (as far as this user may see)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders: list[int] = []
    if not inodes:
        return holders
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    holders.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(holders)


def port_problem(port: int, config: Path, key: str = "port", doing: str = "receive", address: str = "") -> str | None:
    """Why storescp (or with key web_port, the status page) could not listen on this port, or None if it can."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As storescp and http.server bind: with SO_REUSEADDR, so that connections just closed do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
            return None
        except OSError as exc:
            error = exc
    if error.errno == errno.EADDRINUSE:
        holders = port_holders(port)
        if holders:
            who = ", ".join(f"{command_of(pid) or '?'} (pid {pid})" for pid in holders[:3])
            held = f"another program holds it: {who}"
        else:
            held = (f"another program holds it (which, this user cannot see: as root, "
                    f"`ss -ltnp 'sport = :{port}'` shows it)")
        return (f"dumpwatch cannot {doing} on port {port}: {held}.\n"
                f"Stop that program, or set another port in {config} ({key} = ...).")
    if error.errno == errno.EACCES:
        usual = "11112 (DICOM's usual port)" if key == "port" else "11180"
        return (f"dumpwatch cannot {doing} on port {port}: only root may listen on ports below 1024.\n"
                f"Run make run as root, or set {key} = {usual} in {config}.")
    return f"dumpwatch cannot {doing} on port {port}: {error.strerror}."


def take_run_lock(var: Path) -> tuple[int | None, str]:
    """Hold VAR/run.pid while running: (its descriptor, '') or (None, the other runner's pid).
    An flock: it ends with the process that holds it, however that ends."""
    fd = os.open(var / RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        return None, other
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, ""


def serve_in_the_way(dump: Path) -> str | None:
    """Why serve cannot start on this dump (another serve runs on it), or None."""
    holder = read_lock(dump) if dump.is_dir() else None
    if holder is None:
        return None
    above = parent_of(holder.pid) if holder.host == socket.gethostname() else None
    try:
        ours = above is not None and str(SUPERVISORD_CONF).encode() in Path(f"/proc/{above}/cmdline").read_bytes()
    except OSError:
        ours = False
    if ours:
        how = f"Ctrl-C in the terminal of the `make run` that started it, or: kill {above} (its supervisord)"
    else:
        how = "stop the service that runs it (supervisorctl stop dumpwatch, or systemctl stop dumpwatch)"
    return (f"dumpwatch serve is already running on this configuration's dump {dump} ({holder.describe()}).\n"
            f"Stop it first: {how}.")


def example_command(aetitle: str, port: int) -> str:
    from pydicom import examples

    example = str(examples.get_path("mr"))
    return f"TCP_NODELAY=1 storescu -aec {shlex.quote(aetitle)} 127.0.0.1 {port} {shlex.quote(example)}"


def shown(path: Path) -> str:
    """A path as the user may type it here: relative if below the working folder."""
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


class Runner:
    def __init__(self, config: Path, var: Path):
        self.config = config
        self.var = var
        self.process: subprocess.Popen | None = None
        self.status: int | None = None  # supervisord's wait status, once it has ended
        self.stop_reason = ""  # set once we stop: the signal's name, or what went wrong
        self.failed = False  # stopped for a reason other than being asked to
        self.output_open = True
        self.pending = b""  # supervisord's output since its last line break
        self.lock_fd: int | None = None  # VAR/run.pid, held while we run
        self.port = self.web_port = 0

    # -- signals -------------------------------------------------------------------------

    def install_signals(self) -> int:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, self.on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop (the wakeup fd) to reap
        return wake_read

    def on_stop_signal(self, signum: int, _frame: object) -> None:
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str, failed: bool = False) -> None:
        if self.stop_reason:
            return
        self.stop_reason, self.failed = reason, failed
        if self.process is not None and self.status is None:
            try:
                os.kill(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.stop_deadline = time.monotonic() + STOP_WAIT

    # -- children ------------------------------------------------------------------------

    def start_supervisord(self) -> None:
        me = os.getpid()

        def in_child() -> None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != me:  # we died before the line above
                os._exit(1)

        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
        env = {**os.environ, "DUMPWATCH_CONFIG": str(self.config), "DUMPWATCH_VAR": str(self.var)}
        # --user: supervisord runs as who started it, said so (as root, it would warn it had kept root's rights).
        self.process = subprocess.Popen([str(BIN / "supervisord"), "--configuration", str(SUPERVISORD_CONF),
                                         "--user", user],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, cwd=REPO, process_group=0, preexec_fn=in_child)
        if self.stop_reason:  # asked to stop while it started
            os.kill(self.process.pid, signal.SIGTERM)

    def reap(self) -> None:
        """Collect every child that ended: supervisord, or an orphan that came to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.process is not None and pid == self.process.pid:
                self.status = status
                self.process.returncode = os.waitstatus_to_exitcode(status)

    def end_orphans(self) -> list[int]:
        """End what supervisord left (SIGTERM, then SIGKILL); the pids that would not end."""
        me, group = os.getpid(), os.getpgrp()
        told: set[int] = set()
        deadline = time.monotonic() + ORPHAN_WAIT
        killed_at = None
        while True:
            self.reap()
            left = children_of(me)
            if not left:
                return []
            now = time.monotonic()
            for pid in left:
                if pid not in told:
                    told.add(pid)
                    command = command_of(pid)
                    if command:  # (else it is ending already)
                        say(f"make run: stopping {command} (pid {pid}), left behind by supervisord")
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            if now > deadline:
                if killed_at is None:
                    killed_at = now
                elif now - killed_at > 10:
                    return left
                for pid in left:
                    try:
                        pgid = os.getpgid(pid)
                        if pgid != group:
                            os.killpg(pgid, signal.SIGKILL)
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)

    # -- output --------------------------------------------------------------------------

    def relay(self, data: bytes) -> None:
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()[-4096:]
        for line in lines:
            fatal = _FATAL.search(line)
            if fatal and not self.stop_reason:
                name = fatal.group(1).decode(errors="replace")
                self.request_stop(f"{name} could not be kept running: supervisord gave up after it stopped again "
                                  "and again (what it printed is above)", failed=True)
        if not self.output_open:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(1, view):]
        except OSError:  # EPIPE: the reader of our output is gone (tee ended)
            self.output_lost()

    def output_lost(self) -> None:
        self.output_open = False
        self.request_stop("its output was closed (the program reading it ended)", failed=True)

    # -- the run -------------------------------------------------------------------------

    def ready(self, dump: Path) -> bool:
        holder = read_lock(dump) if dump.is_dir() else None
        return listening(self.port) and holder is not None and listening(self.web_port)

    def run(self) -> int:
        try:
            cfg = load_config(self.config)
        except ConfigError as exc:
            say(f"make run: {exc}")
            return 1
        if cfg.dir_dump is None or cfg.dir_out is None:
            say(f"make run: {self.config} must set dir_dump and dir_out")
            return 1
        self.port, self.web_port = cfg.port, cfg.web_port
        self.var.mkdir(parents=True, exist_ok=True)
        self.lock_fd, other = take_run_lock(self.var)
        if self.lock_fd is None:
            say(f"dumpwatch is already running: `make run` (pid {other or '?'}) started it, with its files in "
                f"{self.var}.\nStop it with Ctrl-C in its terminal, or with: kill {other or '<its pid>'}")
            return 1
        try:
            check_web(cfg)  # beyond loopback without logins: refused before anything starts
        except ConfigError as exc:
            say(f"make run: {exc}")
            return 1
        problem = (serve_in_the_way(cfg.dir_dump) or port_problem(cfg.port, self.config)
                   or port_problem(cfg.web_port, self.config, "web_port", "serve the status page", cfg.web_bind))
        if problem:
            say(problem)
            return 1

        prctl(PR_SET_CHILD_SUBREAPER, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # make killed: stop too
        wake = self.install_signals()
        self.start_supervisord()
        assert self.process is not None and self.process.stdout is not None
        source = self.process.stdout.fileno()
        poller = select.poll()
        poller.register(source, select.POLLIN)
        poller.register(wake, select.POLLIN)
        poller.register(1, 0)  # POLLERR: the pipe we write to has no reader any more
        announced = False
        try:
            while True:
                for fd, events in poller.poll(1000 if announced and not self.stop_reason else 200):
                    if fd == source:
                        data = os.read(source, 65536)
                        if data:
                            self.relay(data)
                        else:  # supervisord closed it: it has ended
                            poller.unregister(source)
                            source = -1
                    elif fd == wake:
                        while True:
                            try:
                                if not os.read(wake, 512):
                                    break
                            except BlockingIOError:
                                break
                    elif events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        poller.unregister(1)
                        if self.output_open:
                            self.output_lost()
                self.reap()
                if self.status is not None and not self.stop_reason:
                    self.request_stop(f"supervisord ended unexpectedly ({describe(self.status)})", failed=True)
                if self.status is not None and source == -1:
                    break
                if self.stop_reason and self.status is None and time.monotonic() > self.stop_deadline:
                    say(f"make run: supervisord did not stop within {STOP_WAIT} s; killing it")
                    self.process.kill()
                    self.stop_deadline = float("inf")
                if not announced and not self.stop_reason and self.ready(cfg.dir_dump):
                    announced = True
                    self.announce(cfg)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            left = self.end_orphans()
        if left:
            say(f"make run: these would not end: {', '.join(map(str, left))}")
            return 1
        if self.failed:
            say(f"make run: stopped, as {self.stop_reason}; nothing of it is left running")
            return 1
        say("make run: stopped; nothing of it is left running")
        return 0

    def announce(self, cfg) -> None:
        config = shown(self.config)
        text = (f"\nReceiving on port {cfg.port} as AE title {cfg.aetitle}; sorted files go to {cfg.dir_out}.\n"
                "Send a test image from another terminal with:\n"
                f"  {example_command(cfg.aetitle, cfg.port)}\n"
                f"Check on it with: {shown(BIN / 'dumpwatch')} --config {config} status\n"
                f"or on the status page: http://{web_host(cfg.web_bind)}:{cfg.web_port}/ (metrics at /metrics)\n"
                f"Stop it with Ctrl-C. supervisord's own log: {shown(self.var / 'supervisord.log')}\n\n")
        self.relay(text.encode(errors="backslashreplace"))


def web_host(bind: str) -> str:
    """Where a browser on this machine finds the page bound to bind."""
    if bind in ("0.0.0.0", "::"):
        return "127.0.0.1" if bind == "0.0.0.0" else "[::1]"
    return f"[{bind}]" if ":" in bind else bind


def describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def main() -> None:
    if len(sys.argv) != 3:
        say("usage: scripts/run.py CONFIG VAR")
        sys.exit(2)
    runner = Runner(Path(os.path.abspath(sys.argv[1])), Path(os.path.abspath(sys.argv[2])))
    try:
        sys.exit(runner.run())
    except KeyboardInterrupt:  # Ctrl-C during the checks, before anything started
        sys.exit(130)


if __name__ == "__main__":
    main()
