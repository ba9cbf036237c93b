"""Hooks: the site's next step once a series or study is complete (dcm2niix, a BIDS converter),
run as an argument list. Never through a shell.

A hook is an argv template from the configuration (`on_series_complete = dcm2niix -o
{output_dir} {series_dir}`), split into arguments once, when the configuration is read.
A placeholder fills a whole argument or a part of one and never makes a new argument:
whatever a header says (`$(touch x)`, `; rm -rf ~`, a space, a quote) reaches the program
as text inside the one argument it stands in. An argument whose first character would come
from a value and be "-" gets "_" before it, so that no value can be read as an option. The
same values are in the hook's environment as DUMPWATCH_<NAME>.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dumpwatch import linux

SERIES, STUDY = "on_series_complete", "on_study_complete"

# What each placeholder holds. The series' and the study's hooks share the study's names.
STUDY_FIELDS = {
    "study_dir": "the study's folder in the tree (absolute)",
    "subject": "the study's folder name (the template's first level)",
    "subject_label": "the study's folder name with its letters and digits only (a BIDS participant label)",
    "study_uid": "StudyInstanceUID",
    "study_date": "StudyDate",
    "files": "files sorted (the series' or the study's)",
    "missing": "images known to be missing (the series' or the study's)",
    "verdict": "whole, incomplete or unknown (no expected count and no gaps)",
    "summary": "the verdict in words, e.g. 'missing 1 (7)'",
    "again": "1 when it had been complete before and a late file reopened it, else 0",
    "event": "series_complete or study_complete",
    "dir_out": "the sorted tree's root",
    "output_dir": "hook_output_dir, filled in and made before the hook starts",
}
SERIES_FIELDS = {
    **STUDY_FIELDS,
    "series_dir": "the series' folder in the tree (absolute)",
    "series_folder": "the series' folder name",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "series_uid": "SeriesInstanceUID",
    "modality": "Modality",
    "sender": "the calling AE titles that sent it, separated by commas",
}
STUDY_ONLY = {"series": "the number of series in the study"}
FIELDS = {SERIES: SERIES_FIELDS, STUDY: {**STUDY_FIELDS, **STUDY_ONLY}}
# hook_output_dir may use the names every hook has, but not itself.
# (nor the absolute paths: a value there cannot add folder levels, so they could never work).
OUTPUT_FIELDS = {k: v for k, v in STUDY_FIELDS.items() if k not in ("output_dir", "dir_out", "study_dir")}


def pieces(text: str, fields: dict[str, str], example: str, word: bool = False) -> list[tuple[str, str | None]]:
    """text as (literal text, placeholder or None) pieces; ValueError unless each placeholder
    is a bare name in fields. word: text is one argument of a hook, named in the messages."""
    where = f"{text!r}: " if word else ""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{where}{exc} (write {{{{ and }}}} for a literal brace)") from None
    found: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (spec or conversion or not name.isidentifier()):
            raise ValueError(f"{{{name}}}{f' in {text!r}' if word else ''}: a placeholder is a bare name such as "
                             f"{{{example}}}")
        if name is not None and name not in fields:
            known = ", ".join("{" + f + "}" for f in sorted(fields))
            raise ValueError(f"unknown placeholder {{{name}}} (known: {known})")
        found.append((literal, name))
    return found


def check_output_dir(template: str) -> None:
    """ValueError unless hook_output_dir's placeholders are bare names it may use."""
    pieces(template, OUTPUT_FIELDS, "subject")


def label(name: str) -> str:
    """A name's ASCII letters and digits only: what BIDS allows in a participant label."""
    return "".join(c for c in name if c.isascii() and c.isalnum())


TAIL = 4096  # bytes of a run's output kept in the journal (its last lines)
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a hook past its timeout


@dataclass(frozen=True)
class Template:
    """An argv template: each argument a tuple of (literal text, placeholder or None) pieces."""

    text: str
    args: tuple[tuple[tuple[str, str | None], ...], ...]

    @classmethod
    def parse(cls, text: str, fields: dict[str, str]) -> Template:
        """Split as a POSIX shell would split words (quotes group, nothing else happens), then
        find the {placeholders} in each word. ValueError names what is wrong."""
        try:
            words = shlex.split(text, comments=False, posix=True)
        except ValueError as exc:
            raise ValueError(f"cannot split into arguments: {exc}") from None
        if not words:
            raise ValueError("names no program")
        args = []
        for word in words:
            args.append(tuple(pieces(word, fields, "series_dir", word=True)))
        if any(name for _, name in args[0]):
            raise ValueError("the program (the first word) must be written out, not a placeholder")
        if not args[0] or not args[0][0][0]:
            raise ValueError("the program (the first word) is empty")
        return cls(text, tuple(args))

    @property
    def program(self) -> str:
        return self.args[0][0][0]

    def names(self) -> set[str]:
        return {name for arg in self.args for _, name in arg if name}

    def fill(self, values: dict[str, str]) -> list[str]:
        """The argument list for these values: one argument per word of the template, whatever the values hold."""
        argv = []
        for arg in self.args:
            text = ""
            for literal, name in arg:
                text += literal
                if name is not None:
                    value = _clean(values.get(name, ""))
                    if not text and value.startswith("-"):
                        value = "_" + value  # a value never starts an argument as an option
                    text += value
            argv.append(text)
        return argv


def _clean(value: object) -> str:
    return str(value).replace("\x00", "")  # no NUL reaches execve


def environment(values: dict[str, str], base: dict[str, str] | None = None) -> dict[str, str]:
    """The hook's environment: serve's own, and each value as DUMPWATCH_<NAME>."""
    env = dict(os.environ if base is None else base)
    env.update({f"DUMPWATCH_{name.upper()}": _clean(value) for name, value in values.items()})
    return env


def find_program(program: str) -> str | None:
    """The program's path: as written when it holds a slash, else on PATH or beside
    dumpwatch's own Python (a virtualenv's bin, where pip puts dcm2niix)."""
    if "/" in program:
        return program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    here = os.path.dirname(sys.executable)
    return shutil.which(program) or shutil.which(program, path=here)


def output_dir(template: str, values: dict[str, str]) -> Path:
    """hook_output_dir filled in. A value may not add or climb a folder level (a folder name
    never holds a slash; this holds whatever the tree's names come to be)."""
    filled = {}
    for name, value in values.items():
        value = _clean(value)
        if "/" in value or value in ("", ".", ".."):
            value = value.replace("/", "_") or "_"
            value = "_" if value in (".", "..") else value
        filled[name] = value
    return Path(string.Formatter().vformat(template, (), filled))


@dataclass
class Ran:
    """How one run of a hook ended."""

    exit: int | None  # its exit status; negative: the signal that ended it; None: it never started
    output: str  # its last lines
    timed_out: bool = False
    error: str = ""  # why it could not start

    @property
    def ok(self) -> bool:
        return self.exit == 0 and not self.timed_out and not self.error

    def describe(self, timeout: float) -> str:
        if self.error:
            return self.error
        if self.timed_out:
            return f"still running after hook_timeout ({timeout:g} s): killed with its process group"
        if self.exit is not None and self.exit < 0:
            return f"ended by signal {_signal_name(-self.exit)}"
        return f"exit status {self.exit}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def run(argv: list[str], env: dict[str, str], cwd: str, timeout: float,
        started: Callable[[int, int | None], None], stopping: threading.Event | None = None) -> Ran:
    """Run argv once, in a process group of its own (what a timeout kills), in serve's session:
    a session of its own would be an autogroup of its own, which the kernel gives as much CPU
    as serve's whatever the nice level or policy (measured, bench/hooks.py);
    with its output to an unnamed file of which the last TAIL bytes are kept. started(pid,
    start time) is called as soon as it runs, for the journal. Called on a thread whose CPU
    and I/O priority are already low (lower_priority): the child takes them from it."""
    with tempfile.TemporaryFile() as out:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=cwd, env=env, process_group=0, close_fds=True)
        except OSError as exc:
            return Ran(None, "", error=f"cannot start {argv[0]}: {exc.strerror or exc}")
        started(process.pid, start_time(process.pid))
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            try:
                code = process.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if stopping is not None and stopping.is_set() or time.monotonic() >= deadline:
                    timed_out = time.monotonic() >= deadline
                    kill_group(process.pid, process)
                    code = process.wait()
                    break
        if timed_out:
            kill_group(process.pid)  # what the leader left behind, whatever it did with SIGTERM
        return Ran(code, _tail(out), timed_out=timed_out)


def kill_group(pgid: int, process: subprocess.Popen | None = None) -> None:
    """SIGTERM to the whole process group, then SIGKILL after KILL_GRACE (at once without a
    process to wait for)."""
    try:
        os.killpg(pgid, signal.SIGTERM if process is not None else signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    if process is None:
        return
    try:
        process.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(out) -> str:
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - TAIL))
    data = out.read()
    text = data.decode("utf-8", "replace")
    if size > TAIL:
        text = text.split("\n", 1)[-1]  # from the first whole line
    return text.strip()


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat): with its pid, it names
    that process and no later one that gets the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat; the first two (pid, comm) are gone
    except (OSError, IndexError, ValueError):
        return None


MARK = "DUMPWATCH_RUN"  # in each hook's environment: which journal's which run it is


def kill_leftover(pid: int | None, started: int | None, mark: str) -> int:
    """Kill what a serve killed with -9 left of a hook run, before it runs again: the process
    group of its leader if that pid is still the leader (its start time matches), and the
    group of every process whose environment carries the run's mark (its children, which
    inherit it, even after the leader died or the machine's pids were reused). Returns how
    many processes were found."""
    found = set(marked(mark))
    if pid is not None and started is not None and start_time(pid) == started:
        found.add(pid)
    for each in found:
        try:
            os.killpg(os.getpgid(each), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(found)


def marked(mark: str) -> list[int]:
    """The processes whose environment holds DUMPWATCH_RUN=mark (those this user may read)."""
    wanted = f"{MARK}={mark}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                if wanted in file.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def lower_priority() -> None:
    """This thread (and the hooks it starts) at the lowest CPU and I/O priority: receiving and
    sorting come first. Linux keeps both per thread, and a child takes its thread's.

    serve itself runs at nice 19 (storescp first), so nice alone would give a hook as much CPU
    as sorting: SCHED_IDLE runs the hook only on CPU time nothing else at any nice level wants
    (bench/hooks.py). The idle I/O class counts only under the bfq I/O scheduler."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:
        pass
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):  # not Linux, or refused by a container's seccomp policy
        pass
    linux.ioprio_idle(tid)
