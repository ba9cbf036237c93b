"""The configuration file: DcmServer.cfg loads unchanged; mistakes name file, line and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dumpwatch.config import Config, load_config, read_config
from dumpwatch.errors import ConfigError

from helpers import run

# DcmServer's own sample configuration, as its users have it, with an anon_fields block.
LEGACY = """\
#############################################
# DcmServer Configuration file
#
# Mandatory fields
#   user - Username of account which runs DcmServer
#   port = What port to listen on
#   fname_log = leave blank if no logging
#
# WARNING - No blank lines allowed before EOF
#############################################
user = dicomserver
port = 4004
AETitle = bold
dir_dump = /data2/dicomserver/data/dump/
dir_out = /data2/dicomserver/data/
renameDicom = /data2/dicomserver/renameDicom.py
fname_log = 
extension = dcm
anon_fields
    0010,0010
    0010,0030
\t0008,0090
"""


def write(tmp_path: Path, text: str, name: str = "dumpwatch.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_legacy_dcmserver_cfg_loads_unchanged(tmp_path):
    cfg = read_config(write(tmp_path, LEGACY, "DcmServer.cfg"))
    assert cfg.port == 4004
    assert cfg.aetitle == "bold"
    assert cfg.dir_dump == Path("/data2/dicomserver/data/dump")
    assert cfg.dir_out == Path("/data2/dicomserver/data")
    assert cfg.fname_log is None
    assert cfg.extension == "dcm"
    assert cfg.anon_fields == (0x00100010, 0x00100030, 0x00080090)
    assert cfg.unused == ("user", "renameDicom")
    # DcmServer kept the dump inside dir_out: the quarantine must still be outside the tree.
    assert cfg.quarantine_dir == Path("/data2/dicomserver/quarantine")


def test_check_config_prints_the_effective_configuration(tmp_path):
    path = write(tmp_path, LEGACY, "DcmServer.cfg")
    result = run("--config", str(path), "check-config")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"# {path}"
    assert any(line.startswith("port") and "4004" in line and "# file" in line for line in lines)
    assert any(line.startswith("template") and "# default" in line for line in lines)
    assert any(line.startswith("anon_fields") and "0010,0010, 0010,0030, 0008,0090" in line for line in lines)
    assert "note: 'user' (from DcmServer) is not used" in result.output
    assert "note: 'renameDicom' (from DcmServer) is not used" in result.output
    assert "dir_dump (/data2/dicomserver/data/dump) is inside dir_out" in result.output


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("port = 4004\nprot = 11\n", 2, "prot: unknown key (did you mean 'port'?)"),
        ("port = four\n", 1, "port: not a whole number: 'four'"),
        ("port = 70000\n", 1, "port: 70000 is outside 1..65535"),
        ("AETitle = A_TITLE_LONGER_THAN_16\n", 1, "aetitle: an AE title has 1 to 16 characters"),
        ("port = 1\nPORT = 2\n", 2, "port: given twice (first on line 1)"),
        ("dir_out =\n", 1, "dir_out: needs a value"),
        ("    0010,0010\n", 1, "an indented line belongs below an anon_fields line"),
        ("anon_fields\n    0010-0010\n", 2, "anon_fields: not a tag such as 0010,0010: '0010-0010'"),
        ("file_mode = 0999\n", 1, "file_mode: not an octal mode such as 0664: '0999'"),
        ("template = <PatientsName>/<InstanceNumber>\n", 1, "template: unknown DICOM keyword 'PatientsName'"),
        ("template = <InstanceNumber>\n", 1, "template: a template needs at least a series folder"),
        ("template = ../<PatientID>/<InstanceNumber>\n", 1, "template: '..' is not allowed"),
        ("template = <PixelData>/<InstanceNumber>\n", 1, "PixelData holds OB or OW data"),
        ("group = no-such-group-here\n", 1, "group: no such group on this machine"),
        ("just words\n", 1, "expected 'key = value'"),
        # A wait of 0 s would make an idle serve spin on a whole core.
        ("sweep_interval = 0\n", 1, "sweep_interval: 0 seconds is out of range 1..10000000"),
        ("stable_seconds = 0\n", 1, "stable_seconds: 0 seconds is out of range 0.1..10000000"),
    ],
)
def test_mistakes_name_the_file_line_and_key(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)
    result = run("--config", str(path), "check-config")
    assert result.exit_code == 1
    assert f"Error: {path}:{line}: " in result.output


def test_every_mistake_is_reported_not_only_the_first(tmp_path):
    path = write(tmp_path, "port = four\nprot = 11\nAETitle = A_TITLE_LONGER_THAN_16\nport = 5\n    0010,0010\n"
                           "workers = 2\ndir_out = out\ndir_quarantine = out/q\n")
    expected = [
        f"{path}:1: port: not a whole number: 'four'",
        f"{path}:2: prot: unknown key (did you mean 'port'?)",
        f"{path}:3: aetitle: an AE title has 1 to 16 characters, 'A_TITLE_LONGER_THAN_16' has 22",
        f"{path}:4: port: given twice (first on line 1)",
        f"{path}:5: an indented line belongs below an anon_fields line",
        f"{path}: dir_quarantine: {tmp_path / 'out' / 'q'} is inside the sorted tree {tmp_path / 'out'}; "
        "choose a folder outside it",
    ]
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    assert str(caught.value).splitlines() == expected
    result = run("check-config", "--config", str(path))
    assert result.exit_code == 1
    assert result.output.splitlines() == ["Error: " + expected[0], *expected[1:]]


def test_keys_are_case_insensitive_comments_and_blank_lines_allowed(tmp_path):
    cfg = read_config(write(tmp_path, "# comment\n\nPORT = 104   # the scanner's port\nAeTitle=MRI_3T\n"))
    assert (cfg.port, cfg.aetitle) == (104, "MRI_3T")


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    cfg = read_config(write(tmp_path / "etc", "dir_dump = ../var/dump\ndir_out = ~/sorted\n"))
    assert cfg.dir_dump == tmp_path / "var" / "dump"
    assert cfg.dir_out == Path(os.path.expanduser("~/sorted"))
    assert cfg.quarantine_dir == tmp_path / "var" / "quarantine"
    assert cfg.journal_path == Path(os.path.expanduser("~/sorted")) / ".dumpwatch" / "journal.sqlite3"


def test_new_keys_and_their_values(tmp_path):
    cfg = read_config(write(tmp_path, "dir_out = out\ndir_quarantine = q\njournal = j.sqlite3\n"
                                      "template = <PatientID>/<SeriesNumber>/<InstanceNumber:05>\n"
                                      "file_mode = 0640\ndir_mode = 2750\ngroup = 0\nworkers = 3\n"
                                      "incomplete_timeout = 5\nextension = .DCM\n"))
    assert cfg.quarantine_dir == tmp_path / "q"
    assert cfg.journal_path == tmp_path / "j.sqlite3"
    assert cfg.template.text == "<PatientID>/<SeriesNumber>/<InstanceNumber:05>"
    assert (cfg.file_mode, cfg.dir_mode, cfg.group, cfg.workers) == (0o640, 0o2750, 0, 3)
    assert (cfg.incomplete_timeout, cfg.extension) == (5.0, "DCM")


def test_quarantine_inside_the_sorted_tree_is_refused(tmp_path):
    path = write(tmp_path, "dir_out = out\ndir_quarantine = out/quarantine\n")
    with pytest.raises(ConfigError, match="inside the sorted tree"):
        read_config(path)


def test_config_is_found_by_option_then_environment_then_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DUMPWATCH_CONFIG", raising=False)
    assert load_config(None) == Config()  # nothing anywhere: the defaults
    write(tmp_path, "port = 1\n")
    assert load_config(None).port == 1
    env_file = write(tmp_path, "port = 2\n", "env.cfg")
    monkeypatch.setenv("DUMPWATCH_CONFIG", str(env_file))
    assert load_config(None).port == 2
    option_file = write(tmp_path, "port = 3\n", "option.cfg")
    assert load_config(option_file).port == 3
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.cfg")


@pytest.mark.parametrize("command", [["check-config"], ["config-value", "port"], ["status"],
                                     ["where", "MR.1"], ["check-rules"], ["sort-once", "."], ["send", "."],
                                     ["serve"]])
def test_config_is_taken_after_the_command_too(tmp_path, command):
    """`dumpwatch check-config --config FILE` reads FILE, as `dumpwatch --config FILE check-config`
    does: a mistake in it is found either way (the command goes no further)."""
    path = write(tmp_path, "port = four\n")
    for args in (["--config", str(path), *command], [*command, "--config", str(path)]):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert f"Error: {path}:1: port: not a whole number: 'four'" in result.output, (args, result.output)


def test_config_after_the_command_wins_over_the_one_before(tmp_path):
    before = write(tmp_path, "port = 1\n", "before.cfg")
    after = write(tmp_path, "port = 2\n", "after.cfg")
    result = run("--config", str(before), "config-value", "--config", str(after), "port")
    assert (result.exit_code, result.output) == (0, "2\n")
