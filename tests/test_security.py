"""Security review (docs/security.md): file modes of the secret and the journal, symlinks
planted in the state folder, no shell anywhere, header values that try to leave dir_out,
and what scripts/storescp.sh hands to storescp."""

from __future__ import annotations

import ast
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dcmtk import Serve, wait_for, write_config

from helpers import REPO, make_dicom, run

PACKAGE = REPO / "dumpwatch"
STORESCP_SH = REPO / "scripts" / "storescp.sh"


def sort_once_under_umask(tmp_path: Path, umask: int, *args: str) -> subprocess.CompletedProcess:
    """The real command, as its own process, with the umask a site's supervisor gives it."""
    def set_umask() -> None:
        os.umask(umask)

    return subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(tmp_path / "dumpwatch.cfg"),
                           "sort-once", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=set_umask, cwd=tmp_path)


def anon_site(tmp_path: Path, template_file: Path) -> Path:
    """A site with anonymisation on and its key in the default place: one image, one junk file."""
    (tmp_path / "dumpwatch.cfg").write_text(
        "dir_dump = dump\ndir_out = sorted\ndir_quarantine = quarantine\nanon_profile = basic\nworkers = 1\n")
    make_dicom(tmp_path / "dump" / "MR.1", template_file)
    (tmp_path / "dump" / "junk").write_bytes(b"not dicom")
    return tmp_path / "sorted" / ".dumpwatch"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o000])
def test_the_key_is_0600_and_the_state_never_world_readable(tmp_path, template_file, umask):
    state = anon_site(tmp_path, template_file)
    result = sort_once_under_umask(tmp_path, umask, "dump")
    assert result.returncode == 3, result.stderr  # the junk file is quarantined
    assert mode(state / "anon.key") == 0o600
    assert mode(state / "journal.sqlite3") == 0o660
    assert mode(state / "tree.lock") == 0o660
    assert mode(state) & 0o007 == 0 and mode(state / "tmp") & 0o007 == 0
    # The quarantine holds the original, unanonymised files: others cannot even look in.
    assert mode(tmp_path / "quarantine") & 0o007 == 0
    for reason in (tmp_path / "quarantine").glob("*.reason.txt"):
        assert mode(reason) & 0o007 == 0


def test_a_key_readable_by_others_is_refused(tmp_path, template_file):
    state = anon_site(tmp_path, template_file)
    state.mkdir(parents=True)
    (state / "anon.key").write_text("ab" * 32 + "\n")
    os.chmod(state / "anon.key", 0o640)
    result = run("--config", str(tmp_path / "dumpwatch.cfg"), "sort-once", str(tmp_path / "dump"))
    assert result.exit_code == 1
    assert "the anonymisation key is readable by others (mode 0640)" in result.output
    assert (tmp_path / "dump" / "MR.1").exists()


@pytest.mark.parametrize("name", ["journal.sqlite3", "tree.lock"])
def test_a_symlink_in_the_state_folder_never_exposes_the_key(tmp_path, template_file, name):
    """The state folder is the group's (2770): a member who plants `journal.sqlite3 ->
    anon.key` must not get the key made group-readable (0660) by the next start."""
    state = anon_site(tmp_path, template_file)
    assert sort_once_under_umask(tmp_path, 0o002, "dump").returncode == 3
    key = (state / "anon.key").read_bytes()
    (state / name).unlink()
    (state / name).symlink_to("anon.key")
    make_dicom(tmp_path / "dump" / "MR.2", template_file, InstanceNumber=2)
    result = sort_once_under_umask(tmp_path, 0o002, "dump")
    assert result.returncode != 0
    assert f"{state / name} is a symlink, not dumpwatch's" in result.stderr
    assert mode(state / "anon.key") == 0o600
    assert (state / "anon.key").read_bytes() == key
    assert (tmp_path / "dump" / "MR.2").exists()


def test_a_symlinked_staging_folder_is_never_cleaned(tmp_path, template_file):
    """Staged copies of dead writers are removed at start: never in a folder a symlink names."""
    state = anon_site(tmp_path, template_file)
    assert sort_once_under_umask(tmp_path, 0o002, "dump").returncode == 3
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    os.rmdir(state / "tmp")
    (state / "tmp").symlink_to(victim)
    sort_once_under_umask(tmp_path, 0o002, "dump")
    assert (victim / "precious").read_text() == "keep me"


def start(tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    """sort-once over the dump, or serve, as its own process; a serve that does not refuse
    to start is stopped after 30 s."""
    args = ["sort-once", "dump"] if command == "sort-once" else ["serve"]
    process = subprocess.Popen([sys.executable, "-m", "dumpwatch", "--config", str(tmp_path / "dumpwatch.cfg"),
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               preexec_fn=lambda: os.umask(0o002))
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.terminate()
        out, err = process.communicate(timeout=60)
        err += "\n(still running after 30 s: it did not refuse to start)"
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def snapshot(folder: Path) -> dict:
    """Every entry below folder (and folder itself): its bytes, mode, owner and times."""
    def entry(path: Path) -> tuple:
        st = os.lstat(path)
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        return data, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns

    return {str(p.relative_to(folder)): entry(p) for p in [folder, *folder.rglob("*")]}


def planted(folder: Path) -> Path:
    """Another folder's files, among them what dumpwatch's clean-up of tmp/ would remove."""
    (folder / "tmp").mkdir(parents=True)
    (folder / "precious").write_text("keep me")
    (folder / "tmp" / "notes.txt").write_text("keep me too")
    (folder / "tmp" / "4000000-1.part").write_text("and me")  # no such pid
    return folder


@pytest.mark.parametrize("command", ["sort-once", "serve"])
def test_a_symlinked_state_folder_is_refused_and_its_target_untouched(tmp_path, template_file, command):
    """Anyone who may write dir_out (the group) replaces .dumpwatch with a link to another
    folder: dumpwatch must not clean "staged copies" there, nor put its journal and lock there."""
    state = anon_site(tmp_path, template_file)
    victim = planted(tmp_path / "victim")
    state.parent.mkdir()
    state.symlink_to(victim)
    before = snapshot(victim)
    result = start(tmp_path, command)
    assert result.returncode == 1, result.stderr
    assert f"{state} is a symlink, not dumpwatch's state folder; remove it" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(victim) == before
    assert (tmp_path / "dump" / "MR.1").exists()


@pytest.mark.parametrize("kind", ["file", "another user's folder"])
def test_a_state_folder_that_is_not_dumpwatch_s_own_is_refused(tmp_path, template_file, kind):
    state = anon_site(tmp_path, template_file)
    state.parent.mkdir()
    if kind == "file":
        state.write_text("not a folder")
        expected = f"{state} is not a folder, so not dumpwatch's state folder; remove it"
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the folder to another user")
        nobody = pwd.getpwnam("nobody")
        planted(state)
        for path in [state, *state.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        expected = f"{state} is owned by nobody, not by root"
    before = snapshot(state) if state.is_dir() else state.read_bytes()
    result = start(tmp_path, "sort-once")
    assert result.returncode == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert (snapshot(state) if state.is_dir() else state.read_bytes()) == before
    assert (tmp_path / "dump" / "MR.1").exists()


@pytest.mark.parametrize("name, what", [("journal.sqlite3", "journal"), ("tree.lock", "tree lock"),
                                        ("anon.key", "anonymisation key"), ("tmp", "staging folder")])
def test_a_symlink_below_the_state_folder_is_refused_and_its_target_untouched(tmp_path, template_file, name, what):
    """The state folder is the group's (2770): a member may replace any entry in it by a link."""
    state = anon_site(tmp_path, template_file)
    assert start(tmp_path, "sort-once").returncode == 3
    victim = planted(tmp_path / "victim")
    target = victim / "tmp" if name == "tmp" else victim / "precious"
    if name == "anon.key":  # a key the member knows: the pseudonyms would be theirs to compute
        target.write_text("ab" * 32 + "\n")
        target.chmod(0o600)
    if (state / name).is_dir():
        for leftover in (state / name).iterdir():
            leftover.unlink()
        (state / name).rmdir()
    else:
        (state / name).unlink()
    (state / name).symlink_to(target)
    make_dicom(tmp_path / "dump" / "MR.2", template_file, InstanceNumber=2)
    before = snapshot(victim)
    result = start(tmp_path, "sort-once")
    assert result.returncode == 1, result.stderr
    assert f"{state / name} is a symlink, not dumpwatch's {what}; remove it" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(victim) == before
    assert (tmp_path / "dump" / "MR.2").exists()


# -- hard links in the dump -----------------------------------------------------------------


def linked_in(dump: Path, template_file: Path, elsewhere: Path) -> Path:
    """Another user's private image (0600), and a hard link to it put in the dump."""
    theirs = make_dicom(elsewhere / "theirs.dcm", template_file)
    os.chmod(theirs, 0o600)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    dump.mkdir(parents=True, exist_ok=True)
    os.link(theirs, dump / "MR.linked")
    return theirs


def kept(path: Path) -> tuple:
    """What sorting a link to path must leave alone (its ctime moves: its link count drops)."""
    st = os.lstat(path)
    return st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, path.read_bytes()


def assert_sorted_as_a_copy(theirs: Path, before: tuple, tree: Path, dump: Path) -> None:
    placed = list(tree.rglob("*.dcm"))
    assert len(placed) == 1, placed
    assert placed[0].read_bytes() == before[-1]
    assert os.stat(placed[0]).st_nlink == 1 and os.stat(placed[0]).st_ino != before[0]
    assert kept(theirs) == before  # mode, owner, group and bytes as they were
    assert os.stat(theirs).st_nlink == 1  # only the dump's link is gone
    assert not (dump / "MR.linked").exists()


GROUP = "daemon"  # a group the linked file is not in: a chgrp in place would show


def test_a_hard_link_in_the_dump_is_sorted_as_a_copy_by_sort_once(tmp_path, template_file):
    """A link in the dump to a file elsewhere was moved into the tree, and that file's mode
    and group set to the tree's: another user's 0600 image became readable by the group."""
    dump, out = tmp_path / "dump", tmp_path / "out"
    theirs = linked_in(dump, template_file, tmp_path / "elsewhere")
    before = kept(theirs)
    (tmp_path / "dumpwatch.cfg").write_text(f"file_mode = 0664\ngroup = {GROUP}\n")
    result = run("--config", str(tmp_path / "dumpwatch.cfg"), "sort-once", str(dump), "--out", str(out),
                 "--quarantine", str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    assert_sorted_as_a_copy(theirs, before, out, dump)


def test_a_hard_link_in_the_dump_is_sorted_as_a_copy_by_serve(tmp_path, template_file):
    cfg = write_config(tmp_path / "site", sweep_interval=1, file_mode="0664", group=GROUP)
    dump, tree = tmp_path / "site" / "dump", tmp_path / "site" / "sorted"
    serve = Serve(cfg)
    try:
        theirs = linked_in(dump, template_file, tmp_path / "elsewhere")
        before = kept(theirs)
        wait_for(lambda: not (dump / "MR.linked").exists() or serve.process.poll() is not None, 30,
                 "the linked file sorted")
        assert serve.process.poll() is None, serve.output()
    finally:
        assert serve.stop() == 0, serve.output()
    assert_sorted_as_a_copy(theirs, before, tree, dump)


# -- no shell ------------------------------------------------------------------------------

_SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "execv"),
                ("os", "execvp"), ("os", "execve"), ("os", "execvpe"), ("os", "execle"), ("os", "execlpe"),
                ("os", "spawnl"), ("os", "spawnlp"), ("os", "spawnv"), ("os", "spawnvp"), ("os", "posix_spawn"),
                ("os", "posix_spawnp"), ("pty", "spawn"), ("subprocess", "getoutput"),
                ("subprocess", "getstatusoutput")}


def shell_uses(source: str, filename: str = "<source>") -> list[str]:
    """Calls that run a shell (or another program) found in Python source, as file:line text."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.split(".")[0] in ("subprocess", "pty", "commands") for n in names):
                found.append(f"{filename}:{node.lineno}: imports {names}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in _SHELL_CALLS:
                found.append(f"{filename}:{node.lineno}: {func.value.id}.{func.attr}")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and not keyword.value.value):
                found.append(f"{filename}:{node.lineno}: shell=...")
    return found


def test_the_source_scan_finds_what_it_looks_for():
    planted = ("import os, subprocess\nos.system('ls')\nx = os.popen('id')\n"
               "subprocess.run(cmd, shell=True)\nsubprocess.getoutput('x')\n")
    found = shell_uses(planted)
    assert len(found) == 5, found
    assert shell_uses("import os\nos.path.join('a', 'b')\nf(shell=False)\n") == []


# The programs dumpwatch runs, each DCMTK's and as an argument list, never through a shell:
# `status` asks storescp for a C-ECHO with echoscu (fixed words and configured values:
# test_status_runs_echoscu_alone_as_an_argument_list); `send` runs storescu with absolute
# file paths and a profile of UIDs it has checked (test_send_runs_storescu_alone_as_an_argument_list).
# hooks.py runs the program the site configured (on_series_complete, on_study_complete) with
# the argument list its template makes: one Popen, never a shell
# (test_hooks_run_the_configured_program_alone_as_an_argument_list; the values' inertness is
# tested end to end in test_hooks.py).
_ALLOWED = {"status.py": {"imports ['subprocess']"}, "send.py": {"imports ['subprocess']"},
            "hooks.py": {"imports ['subprocess']"}}


def test_no_shell_or_program_is_run_anywhere_in_the_package():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) > 10
    found = [hit for path in files for hit in shell_uses(path.read_text(), path.name)
             if hit.split(": ", 1)[1] not in _ALLOWED.get(path.name, set())]
    assert found == [], "dumpwatch must never run a shell or a program: " + "; ".join(found)


def test_hooks_run_the_configured_program_alone_as_an_argument_list():
    tree = ast.parse((PACKAGE / "hooks.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"]
    assert [call.func.attr for call in calls] == ["Popen"]
    [popen] = calls
    assert [k.arg for k in popen.keywords if k.arg in ("shell", "executable")] == []
    assert isinstance(popen.args[0], ast.Name) and popen.args[0].id == "argv"
    run = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "run")
    assert run.args.args[0].arg == "argv" and ast.unparse(run.args.args[0].annotation) == "list[str]"
    # serve's one caller passes what Template.fill made, with the program found on PATH as its first word.
    actions = (PACKAGE / "actions.py").read_text()
    assert actions.count("hooks.run(") == 1 and "argv = template.fill(values)" in actions


def test_status_runs_echoscu_alone_as_an_argument_list():
    tree = ast.parse((PACKAGE / "status.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"]
    # one Popen (the C-ECHO runs while the rest of the report is read), never with a shell
    assert [(call.func.attr, [k.arg for k in call.keywords if k.arg == "shell"]) for call in calls] == [("Popen", [])]
    [argument] = calls[0].args
    commands = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == [getattr(argument, "id", "")]]
    assert len(commands) == 1 and isinstance(commands[0], ast.List), "the command is one list, made in one place"
    assert isinstance(commands[0].elts[0], ast.Constant) and commands[0].elts[0].value == "echoscu"


# -- header values never leave dir_out ------------------------------------------------------

HOSTILE = {
    "PatientName": "../../../../escaped",
    "SeriesDescription": "/tmp/absolute\0nul",
    "StudyDate": "..",
    "PatientID": "../..",
}


def test_hostile_header_values_stay_below_dir_out(tmp_path, template_file):
    dump, out = tmp_path / "deep" / "dump", tmp_path / "deep" / "out"
    make_dicom(dump / "MR.1", template_file, **HOSTILE)
    make_dicom(dump / "MR.2", template_file, PatientName="/etc/passwd", SeriesDescription="..\\..\\x", EchoNumbers="2")
    template = "<StudyDate>-<PatientName>/<PatientID>/<SeriesNumber:03>-<SeriesDescription>/<InstanceNumber:04>"
    (tmp_path / "dumpwatch.cfg").write_text(f"template = {template}\n")
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "deep")}
    result = run("--config", str(tmp_path / "dumpwatch.cfg"), "sort-once", str(dump), "--out", str(out))
    assert result.exit_code == 0, result.output
    placed = [p for p in out.rglob("*.dcm")]
    assert len(placed) == 2
    for path in placed:
        assert path.resolve().is_relative_to(out.resolve())
        rel = path.relative_to(out)
        assert not any(part.startswith(".") or "\0" in part or "\\" in part for part in rel.parts), rel
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "deep")} == before
    assert not Path("/tmp/absolute").exists() or not any(Path("/tmp/absolute").iterdir())


# -- the quarantine's own names -------------------------------------------------------------


def test_a_file_named_like_a_reason_file_is_never_overwritten_by_one(tmp_path):
    """x.reason.txt quarantined first, then x: x's reason file must not take its name."""
    dump = tmp_path / "dump"
    (dump / "a").mkdir(parents=True)
    (dump / "b").mkdir()
    (dump / "a" / "x.reason.txt").write_bytes(b"the file's own bytes")
    (dump / "b" / "x").write_bytes(b"other bytes")
    result = run("sort-once", str(dump), "--out", str(tmp_path / "out"), "--quarantine", str(tmp_path / "q"))
    assert result.exit_code == 3, result.output
    contents = sorted(p.read_bytes() for p in (tmp_path / "q").iterdir())
    assert b"the file's own bytes" in contents and b"other bytes" in contents
    assert len(contents) == 4  # two files, two reasons


# -- storescp -------------------------------------------------------------------------------

_EXEC_OPTIONS = {"-xcr", "--exec-on-reception", "-xcs", "--exec-on-eostudy", "-xs", "--exec-sync",
                 "-rns", "--rename-on-eostudy"}


def storescp_arguments(tmp_path: Path, aetitle: str) -> list[str]:
    """Run scripts/storescp.sh with a stand-in storescp that records the arguments it gets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    fake = bin_dir / "storescp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "{record}"\n')
    fake.chmod(0o755)
    dumpwatch = bin_dir / "dumpwatch"
    dumpwatch.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dumpwatch "$@"\n')
    dumpwatch.chmod(0o755)
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text(f"port = 11999\nAETitle = {aetitle}\ndir_dump = dump dir\ndir_out = out\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DUMPWATCH": str(dumpwatch),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(STORESCP_SH), str(cfg)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return record.read_bytes().decode().split("\0")[:-1]


def test_storescp_sh_never_asks_storescp_to_run_a_command(tmp_path):
    args = storescp_arguments(tmp_path, "-xcr")  # an AE title that looks like an option stays a value
    assert not _EXEC_OPTIONS & set(args[: args.index("--aetitle")] + args[args.index("--aetitle") + 2 :]), args
    assert args[args.index("--aetitle") + 1] == "-xcr"
    assert args[args.index("--output-directory") + 1] == str(tmp_path / "dump dir")
    assert args[-1] == "11999"
    assert (tmp_path / "dump dir").is_dir()


def test_storescp_sh_text_holds_no_exec_option():
    code = [line.split("#", 1)[0] for line in STORESCP_SH.read_text().splitlines()]
    words = {word.strip("\"'") for line in code for word in line.split()}
    assert not _EXEC_OPTIONS & words
    assert not any("exec-on" in line or "eostudy" in line for line in code)


def test_send_runs_storescu_alone_as_an_argument_list():
    tree = ast.parse((PACKAGE / "send.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"]
    assert [(call.func.attr, [k.arg for k in call.keywords if k.arg == "shell"]) for call in calls] == [("Popen", [])]
    from dumpwatch.send import Receiver, storescu_argv

    receiver = Receiver("127.0.0.1", 104, "PACS", "DUMPWATCH")
    argv = storescu_argv(Path("/tmp/profile.cfg"), receiver, ["/a/-rf", "/b/$(id)"])
    assert argv[0] == "storescu" and argv[-2:] == ["/a/-rf", "/b/$(id)"]  # paths as they are, never options
    with pytest.raises(AssertionError):
        storescu_argv(Path("/tmp/profile.cfg"), receiver, ["-rf"])
