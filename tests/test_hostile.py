"""Hostile input: any header value, any bytes, any cut of a real file, any kind of directory
entry. Each case ends sorted inside dir_out or in the quarantine with its reason, never
outside dir_out, never lost, and never stops the watcher."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import stat
import subprocess
import tempfile
import time
import unicodedata
from pathlib import Path

import pytest
from dcmtk import Serve, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from dumpwatch.config import Config
from dumpwatch.identity import data_set_identity
from dumpwatch.naming import DEFAULT_TEMPLATE, Template
from dumpwatch.outcomes import Handled
from dumpwatch.sortonce import sort_dir

from helpers import FIELDMAP, TESTDATA, make_dicom, run, tree_of

TEMPLATES = [
    Template.parse(DEFAULT_TEMPLATE),
    # Other value representations: LO, TM, LT, and a number padded in a folder name.
    Template.parse("<PatientID>_<StudyTime>/<AcquisitionNumber:02>-<ProtocolName>/<InstanceNumber:04>-<ImageComments>"),
]
NAMING_FIELDS = sorted({f.keyword for t in TEMPLATES for c in t.components for f in c if not isinstance(f, str)}
                       | {"EchoNumbers", "SeriesInstanceUID"})
HOSTILE_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def quiet_pydicom():
    """pydicom logs a warning for each value that breaks its VR's rules: here, thousands."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sort_config(base: Path, template: Template = TEMPLATES[0]) -> Config:
    """A configuration in base; a short file counts as truncated at once (nothing is arriving)."""
    return Config(dir_out=base / "out", dir_quarantine=base / "quarantine", template=template,
                  incomplete_timeout=0)


def sort_inputs(base: Path, inputs: dict[str, bytes], cfg: Config) -> dict[str, Handled]:
    """Write inputs into base/dump, sort them in-process, and check where each one went."""
    dump = base / "dump"
    dump.mkdir()
    for name, data in inputs.items():
        (dump / name).write_bytes(data)
    outcomes: list[Handled] = []
    summary = sort_dir(dump, cfg, on_outcome=outcomes.append)
    assert not summary.stopped and not summary.unreadable
    return check_landed(base, inputs, outcomes, cfg)


def check_landed(base: Path, inputs: dict[str, bytes], outcomes: list[Handled], cfg: Config) -> dict[str, Handled]:
    """Every input is in the tree at a safe place or in the quarantine with its reason, with
    its bytes unchanged; the dump is empty; nothing was made beside dump, tree and quarantine."""
    by_name = {Path(o.source).name: o for o in outcomes}
    assert sorted(by_name) == sorted(inputs) and len(outcomes) == len(inputs)
    assert sorted(os.listdir(base / "dump")) == [], "inputs left in the dump"
    assert set(os.listdir(base)) <= {"dump", "out", "quarantine"}
    quarantined = {}
    if cfg.quarantine_dir.exists():
        quarantined = {sha256(p.read_bytes()): p for p in cfg.quarantine_dir.iterdir()
                       if not p.name.endswith(".reason.txt")}
    for name, data in inputs.items():
        outcome = by_name[name]
        if outcome.outcome in ("sorted", "duplicate"):
            dest = Path(outcome.detail)
            assert_safe_place(dest, cfg)
            held = dest.read_bytes()
            if outcome.outcome == "sorted":
                assert sha256(held) == sha256(data), f"{name}: the tree holds other bytes at {dest}"
            else:  # the same data set; the file meta (group 0002) may differ
                assert data_set_identity(held, len(held)) == data_set_identity(data, len(data)), \
                    f"{name}: the tree holds another data set at {dest}"
        else:
            assert outcome.outcome == "quarantined", (name, outcome)
            assert sha256(data) in quarantined, f"{name}: quarantined, but its bytes are not in the quarantine"
            place = quarantined[sha256(data)]
            reason = (place.parent / (place.name + ".reason.txt")).read_text().splitlines()
            assert reason and reason[0].strip(), f"{name}: no reason beside {place}"
    tree = tree_of(cfg.dir_out) if cfg.dir_out.exists() else {}
    placed = {sha256(d) for n, d in inputs.items() if by_name[n].outcome == "sorted"}
    matched = {sha256(Path(by_name[n].detail).read_bytes()) for n in inputs if by_name[n].outcome == "duplicate"}
    assert set(tree.values()) == placed | matched, "the tree holds files no input explains"
    return by_name


def assert_safe_place(dest: Path, cfg: Config) -> None:
    """dest is a plain, readable DICOM file inside dir_out, each component one safe name."""
    out = os.path.realpath(cfg.dir_out)
    assert os.path.realpath(dest).startswith(out + os.sep), f"{dest} is outside {out}"
    assert os.path.realpath(dest) == os.path.abspath(dest), f"{dest} is reached through a link"
    parts = dest.relative_to(cfg.dir_out).parts
    assert len(parts) == len(cfg.template.components), parts
    for part in parts:
        assert part and part not in (".", "..") and not part.startswith("."), repr(part)
        assert len(part.encode("utf-8", "surrogateescape")) <= 255, (len(part.encode()), part)
        assert "/" not in part and "\\" not in part and "\0" not in part, repr(part)
        assert part == part.strip(), repr(part)
        assert not [c for c in part if unicodedata.category(c)[0] == "C"], f"control or format character in {part!r}"
    assert stat.S_ISREG(os.lstat(dest).st_mode)
    try:
        assert dcmread(dest).SOPInstanceUID  # pydicom still reads it
    except ValueError as exc:
        # A SpecificCharacterSet with a NUL byte in it ('\x00SO_IR 100', found by hypothesis)
        # makes pydicom 3 raise, where it warns of any other unknown one. The file is the
        # sender's data set, byte for byte (check_landed), and dumpwatch read it well.
        assert "embedded null character" in str(exc), exc
        assert b"\x08\x00\x18\x00" in dest.read_bytes()  # its SOPInstanceUID element


# -- 1. any header value --------------------------------------------------------------------

# Pieces that have broken path builders: separators, dots, controls, look-alikes, bidi,
# combining marks, DICOM's own delimiters, shell and URL tricks.
FRAGMENTS = ["/", "\\", "..", ".", "\0", " ", "^", "=", "*", "?", "\n", "\r", "\t", "\x1b[31m", "\x7f",
             "\u202e", "\u200b", "\ufeff", "\u00ad", "\u2028", "\x85", "é", "e\u0301", "\u0301", "山田",
             "\uff0e", "\uff0f", "\u2215", "\u2024", "~", "$(reboot)", "`id`", "%2e%2e", "-", "_", "𝟘",
             "\U0001f600", "\ue000", "CON", "-rf", "A" * 70]
LONG = ["x" * 300, "é" * 200, "山" * 100, "/" * 300, "." * 400, " " * 300, "\0" * 257, "9" * 400,
        "a/" * 200, "..\\" * 150, "\U0001f600" * 80, "x" * 5000]


def _encoded(text: str) -> bytes:
    return text.encode("utf-8")


VALUES = st.one_of(
    st.none(),  # absent
    st.sampled_from(["", " ", "  ", ".", "..", "...", ".hidden", "../../etc", "/etc/passwd", "\\", "^", "=",
                     "^^^^", "==", "\0", "0", "-1", "1e3", "1e400", "nan", "inf", "2\\3", "\\", "1.5"]).map(_encoded),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=12).map("".join).map(_encoded),
    st.text(st.characters(codec="utf-8"), max_size=300).map(_encoded),
    st.binary(max_size=300),
    st.integers(-(10**40), 10**40).map(str).map(_encoded),
    st.sampled_from(LONG).map(_encoded),
)
CHARSETS = st.sampled_from([None, b"", b"ISO_IR 192", b"ISO_IR 100", b"GB18030", b"ISO 2022 IR 87",
                            b"ISO_IR 13\\ISO 2022 IR 87", b"bogus charset", b"\\\\", b"\xff\xfe"])
HEADERS = st.fixed_dictionaries({kw: VALUES for kw in NAMING_FIELDS})


def _set_raw(ds, keyword: str, value: bytes | None, pad: bool) -> None:
    """Set an element's bytes exactly as a scanner might send them, valid for its VR or not."""
    tag = keyword_dict[keyword]
    if value is None:
        if tag in ds:
            del ds[tag]
        return
    if pad and len(value) % 2:
        value += b"\0" if keyword.endswith("UID") else b" "
    ds[tag] = RawDataElement(BaseTag(tag), dictionary_VR(tag), len(value), value, 0, False, True)


def hostile_file(template: bytes, header: dict[str, bytes | None], charset: bytes | None, pad: bool) -> bytes:
    """A real scanner file with these raw header values and a new SOPInstanceUID."""
    ds = dcmread(io.BytesIO(template))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    current = ds.get_item(0x00080005)
    if charset != (current.value if current is not None else None):
        # pydicom re-encodes every text value when the character set changes: change it
        # first, then read the file again, so the raw values below are written as they are.
        _set_raw(ds, "SpecificCharacterSet", charset, pad)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=False)
        ds = dcmread(io.BytesIO(buffer.getvalue()))
    for keyword, value in header.items():
        _set_raw(ds, keyword, value, pad)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    written = dcmread(io.BytesIO(data))
    for keyword, value in header.items():  # the bytes went into the file as given
        tag = keyword_dict[keyword]
        if value is not None:
            assert (written.get_item(tag).value or b"").rstrip(b" \0") == value.rstrip(b" \0")
    return data


@pytest.fixture(scope="module")
def template_bytes() -> bytes:
    return (TESTDATA / FIELDMAP / "e1_01.dcm").read_bytes()


@HOSTILE_SETTINGS
@given(headers=st.lists(HEADERS, min_size=1, max_size=3), charset=CHARSETS, pad=st.booleans(),
       template=st.sampled_from(TEMPLATES))
def test_any_header_values_sort_to_a_safe_place_inside_dir_out(template_bytes, headers, charset, pad, template):
    inputs = {f"MR.{n}": hostile_file(template_bytes, h, charset, pad) for n, h in enumerate(headers)}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        outcomes = sort_inputs(base, inputs, sort_config(base, template))
        # Each is a whole file with a SOPInstanceUID: every one is sorted, none is rejected.
        assert {o.outcome for o in outcomes.values()} <= {"sorted"}, outcomes


def test_header_values_that_make_every_name_too_long_or_empty(tmp_path, template_bytes):
    """The extremes together, once each: every field empty, only dots, or far too long."""
    inputs = {}
    for number, text in enumerate(["", " ", ".", "..", "\0" * 10, "/" * 300, "é" * 5000, "\U0001f600" * 1000]):
        header = {kw: text.encode() for kw in NAMING_FIELDS if not kw.endswith("UID")}
        inputs[f"MR.{number}"] = hostile_file(template_bytes, header, b"ISO_IR 192", pad=True)
    outcomes = sort_inputs(tmp_path, inputs, sort_config(tmp_path))
    assert {o.outcome for o in outcomes.values()} == {"sorted"}
    names = sorted(str(Path(o.detail).relative_to(tmp_path / "out")) for o in outcomes.values())
    assert len(set(names)) == len(inputs)  # none overwrote another
    # An empty InstanceNumber reads as no number at all (naming.instance_number): "No", not "Empty".
    empty = "EmptyStudyDate-EmptyPatientName/EmptySeriesNumber-EmptySeriesDescription/NoInstanceNumber.dcm"
    assert empty in names, names


# -- 2. any bytes ---------------------------------------------------------------------------


def _mutated(base: bytes):
    """A real file with a few bytes overwritten: may still sort, or be rejected; never lost."""
    return st.lists(st.tuples(st.integers(0, len(base) - 1), st.binary(min_size=1, max_size=8)),
                    min_size=1, max_size=6).map(lambda edits: _apply(base, edits))


def _apply(base: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(base)
    for offset, chunk in edits:
        data[offset : offset + len(chunk)] = chunk
    return bytes(data[: len(base)])


REAL = (TESTDATA / FIELDMAP / "e1_01.dcm").read_bytes() if (TESTDATA / FIELDMAP / "e1_01.dcm").exists() else b""
META_END = 144 + int.from_bytes(REAL[140:144], "little") if REAL else 0

# (bytes, whether it must be quarantined)
BLOBS = st.one_of(
    st.binary(max_size=3000).map(lambda b: (b, True)),
    st.binary(max_size=3000).map(lambda b: (b"\0" * 128 + b"DICM" + b, True)),
    st.binary(max_size=3000).map(lambda b: (REAL[:META_END] + b, True)),  # real file meta, random data set
    st.binary(min_size=1, max_size=200).map(lambda b: (b * (6000 // len(b)), True)),  # a repeated pattern
    _mutated(REAL).map(lambda b: (b, False)),
)


@HOSTILE_SETTINGS
@given(blobs=st.lists(BLOBS, min_size=1, max_size=4))
def test_random_bytes_are_quarantined_with_a_reason(testdata, blobs):
    inputs = {f"MR.{n}": data for n, (data, _) in enumerate(blobs)}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        outcomes = sort_inputs(base, inputs, sort_config(base))
    for number, (_, must_quarantine) in enumerate(blobs):
        if must_quarantine:
            assert outcomes[f"MR.{number}"].outcome == "quarantined", outcomes[f"MR.{number}"]


# -- 3. every cut of a real file ------------------------------------------------------------


def element_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(start, value start, end) of every top-level element, file meta included, as pydicom
    walks the file; for encapsulated pixel data, of each of its items too."""
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    implicit, little = ds.original_encoding
    stream = io.BytesIO(data)
    stream.seek(132)
    elements = []
    for part_implicit, part_little, in_meta in ((False, True, True), (implicit, little, False)):
        start = stream.tell()
        stop = (lambda tag, vr, length: tag.group != 2) if in_meta else None
        for elem in data_element_generator(stream, part_implicit, part_little, stop_when=stop, defer_size=0):
            end = stream.tell()
            value_at = elem.value_tell
            elements.append((start, value_at, end))
            if elem.tag == 0x7FE00010 and elem.length == 0xFFFFFFFF:  # items of encapsulated pixel data
                position = value_at
                while position + 8 <= end:
                    length = int.from_bytes(data[position + 4 : position + 8], "little" if part_little else "big")
                    elements.append((position, position + 8, min(end, position + 8 + length)))
                    position += 8 + (0 if length == 0xFFFFFFFF else length)
            start = end
    return elements


def cuts_of(data: bytes) -> set[int]:
    """Every element boundary; inside each element's header and value; many inside the pixel data."""
    cuts = {0, 1, 127, 128, 131, 132, 133}
    for start, value_at, end in element_offsets(data):
        cuts |= {start, start + 1, start + 4, value_at - 1, value_at, (value_at + end) // 2, end - 1, end}
    pixels = [e for e in element_offsets(data) if data[e[0] : e[0] + 4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")]
    start, value_at, end = pixels[-1]
    cuts |= set(range(value_at, end, max(1, (end - value_at) // 16)))
    cuts |= set(range(len(data) - 8, len(data)))
    return {c for c in cuts if 0 <= c < len(data)}


@pytest.mark.parametrize("rel", [
    "siemens_fieldmap/2_gre_field_magph/e1_01.dcm",  # explicit VR little endian, Siemens CSA headers
    "transfer_syntax/2.dcm",  # implicit VR
    "transfer_syntax/3.dcm",  # explicit VR big endian
    "transfer_syntax/5.dcm",  # encapsulated (JPEG lossless) pixel data: cut at and inside its items
])
def test_a_real_file_cut_anywhere_is_quarantined_whole_it_sorts(tmp_path, testdata, rel):
    data = (testdata / rel).read_bytes()
    cuts = cuts_of(data)
    assert len(cuts) > 400  # the walk found the elements
    dump = tmp_path / "dump"
    dump.mkdir()
    old = time.time() - 3600  # received an hour ago: none of them is still arriving
    for cut in cuts:
        (dump / f"cut-{cut:06d}").write_bytes(data[:cut])
        os.utime(dump / f"cut-{cut:06d}", (old, old))
    (dump / "whole").write_bytes(data)
    result = run("sort-once", str(dump), "--out", str(tmp_path / "out"), "--quarantine", str(tmp_path / "q"))
    assert result.exit_code == 3, result.output
    assert f"  {'quarantined':<12}{len(cuts):>7}  in " in result.output, result.output
    assert [p for p in dump.iterdir()] == []
    assert list(tree_of(tmp_path / "out").values()) == [sha256(data)]  # the whole file, alone
    quarantine = tmp_path / "q"
    for cut in cuts:
        name = f"cut-{cut:06d}"
        assert (quarantine / name).read_bytes() == data[:cut], name
        reason = (quarantine / f"{name}.reason.txt").read_text().splitlines()[0]
        if cut >= 132 or data[:cut].count(0) == cut:  # past 'DICM', or only zeros: it is short
            assert reason.startswith("truncated: "), (cut, reason)
        else:
            assert reason == f"not a DICOM file (only {cut} bytes)", (cut, reason)
    assert set(os.listdir(tmp_path)) == {"dump", "out", "q"}


def test_zero_length_files(tmp_path):
    """Empty files: left while they may still be arriving, then quarantined; never sorted."""
    cfg = Config(dir_out=tmp_path / "out", dir_quarantine=tmp_path / "q", incomplete_timeout=3600)
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "MR.new").write_bytes(b"")
    summary = sort_dir(dump, cfg)
    assert summary.counts["left"] == 1 and (dump / "MR.new").exists()
    assert summary.problems[0].detail == "incomplete, may still be arriving: empty file (0 bytes)"
    old = time.time() - 7200
    os.utime(dump / "MR.new", (old, old))
    (dump / "MR.old").write_bytes(b"")
    os.utime(dump / "MR.old", (old, old))
    summary = sort_dir(dump, cfg)
    assert summary.counts["quarantined"] == 2 and not list(dump.iterdir())
    for name in ("MR.new", "MR.old"):
        assert (tmp_path / "q" / name).read_bytes() == b""
        assert (tmp_path / "q" / f"{name}.reason.txt").read_text().startswith("truncated: empty file (0 bytes)\n")
    assert not tree_of(tmp_path / "out")


# -- 4. what else a dump can hold, with serve running -----------------------------------------


def test_serve_survives_every_kind_of_entry_in_the_dump(tmp_path, template_file):
    """FIFOs, sockets, folders, symlinks and empty files in the dump while serve runs.

    What the code does with each (arrivals.py, dicomfile.py):
    - a FIFO, a socket, a device, a symlink (to a file, a folder, or nothing): found by the
      sweep (or by a close event), opened with O_NOFOLLOW | O_NONBLOCK (a FIFO never blocks,
      a link is never followed), rejected as not a regular file: the entry itself is moved
      to the quarantine, its reason beside it;
    - a folder: never handed over (serve watches the dump's top level, the sweep skips
      folders), so it and what it holds are left alone;
    - an empty file: left while it may still be arriving, quarantined as truncated after
      incomplete_timeout.
    """
    site = write_config(tmp_path / "site", sweep_interval=1, stable_seconds=0.5, incomplete_timeout=1)
    dump, quarantine, tree = tmp_path / "site" / "dump", tmp_path / "site" / "quarantine", tmp_path / "site" / "sorted"
    precious = make_dicom(tmp_path / "outside" / "precious.dcm", template_file, InstanceNumber=99)
    content, before = precious.read_bytes(), os.lstat(precious)
    serve = Serve(site)
    listener = socket.socket(socket.AF_UNIX)
    try:
        expected = {
            "fifo": "a FIFO, not a file",
            "fifo-opened": "a FIFO, not a file",
            "socket": "a socket, not a file",
            "link-to-dicom": "a symbolic link: not followed",
            "link-dangling": "a symbolic link: not followed",
            "link-to-folder": "a symbolic link: not followed",
            "link-to-fifo": "a symbolic link: not followed",
            "empty": "truncated: empty file (0 bytes)",
        }
        os.mkfifo(dump / "fifo")
        os.mkfifo(dump / "fifo-opened")
        os.close(os.open(dump / "fifo-opened", os.O_RDWR))  # a close event: handed over at once
        listener.bind(str(dump / "socket"))
        listener.listen()
        (dump / "link-to-dicom").symlink_to(precious)
        (dump / "link-dangling").symlink_to(tmp_path / "nowhere")
        (dump / "link-to-folder").symlink_to(precious.parent)
        (dump / "link-to-fifo").symlink_to(dump / "fifo")
        (dump / "empty").write_bytes(b"")
        make_dicom(dump / "folder" / "inside.dcm", template_file, InstanceNumber=98)
        if os.geteuid() == 0:  # only root may make a device node: a copy of /dev/null
            os.mknod(dump / "device", stat.S_IFCHR | 0o600, os.makedev(1, 3))
            expected["device"] = "a device, not a file"

        def missing() -> list[str]:
            # the entry itself: its reason file is made before it moves in, and written by then
            return [n for n in expected if not os.path.lexists(quarantine / n)]

        deadline = time.monotonic() + 30
        while missing() and serve.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert serve.process.poll() is None, serve.output()
        assert not missing(), f"not quarantined: {missing()}; in the dump: {os.listdir(dump)}\n{serve.output()}"
        for name, reason in expected.items():
            assert (quarantine / f"{name}.reason.txt").read_text().splitlines()[0] == reason, name
            assert not os.path.lexists(dump / name), name
        assert stat.S_ISFIFO(os.lstat(quarantine / "fifo").st_mode)
        assert stat.S_ISSOCK(os.lstat(quarantine / "socket").st_mode)
        assert os.readlink(quarantine / "link-to-dicom") == str(precious)  # the link itself, moved aside
        assert (quarantine / "empty").read_bytes() == b""

        # Normal files afterwards are sorted (one with a name that is not UTF-8, holding a
        # newline); nothing else ever reached the tree.
        make_dicom(dump / "MR.normal", template_file, InstanceNumber=7)
        make_dicom(dump / os.fsdecode(b"MR.\xff\nodd"), template_file, InstanceNumber=8)
        wait_for(lambda: len(tree_of(tree)) >= 2 or serve.process.poll() is not None, 20, "the normal files sorted")
        time.sleep(1.5)  # another sweep: the folder is still left alone
        assert serve.process.poll() is None, serve.output()
        assert sorted(tree_of(tree)) == ["20210715-phantom/002-gre_field_magph/0007.dcm",
                                         "20210715-phantom/002-gre_field_magph/0008.dcm"]
        assert sorted(os.listdir(dump)) == [".dumpwatch.lock", "folder"]
        assert os.listdir(dump / "folder") == ["inside.dcm"]
    finally:
        listener.close()
        try:
            code = serve.stop()
        except subprocess.TimeoutExpired:  # it hangs: end it (its workers die with it)
            serve.process.kill()
            serve.process.wait()
            pytest.fail(f"serve did not stop within 60 s of SIGTERM\n{serve.output()}")
    assert code == 0, serve.output()
    assert "Traceback" not in serve.output(), serve.output()
    # The symlinks' target was never sorted, moved, or changed.
    def identity(st: os.stat_result) -> tuple:
        return st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns

    assert identity(os.lstat(precious)) == identity(before)
    assert precious.read_bytes() == content
