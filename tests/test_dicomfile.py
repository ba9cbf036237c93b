"""Reading a received file: every real file reads; no truncated copy of one is ever accepted."""

from __future__ import annotations

import io
import os
import random
import socket

import pytest
from pydicom import dcmread
from pydicom.filereader import data_element_generator

from dumpwatch.dicomfile import NotRegular, read_dicom
from dumpwatch.errors import Incomplete, Rejected
from dumpwatch.identity import Placed, data_set_identity, same_data_set
from dumpwatch.naming import DEFAULT_TEMPLATE, Template, naming_tags

from helpers import make_dicom

# One file of each structure: classic, nested Philips, GE private, enhanced multi-frame,
# spectroscopy, encapsulated pixel data, implicit VR, big endian, raw data.
SAMPLES = [
    "siemens_fieldmap/2_gre_field_magph/e1_01.dcm",
    "philips/2001_fcMRI_Field_Mapping/2001_0002_e2.dcm",
    "ge/6_CV_Neuro/i100572.MRDC.17",
    "enhanced/siemens_xa10/6_1.dcm",
    "nonimage/mrs_siemens/31_svs_se/31001_1.3.12.2.1107.5.2.61.237021.2026060513334674585008321.dcm",
    "transfer_syntax/2.dcm",
    "transfer_syntax/3.dcm",
    "transfer_syntax/5.dcm",
    "transfer_syntax/9.dcm",
    "nonimage/raw_philips/1301_WIP_ADNI_Sag3D_MPRAGE_Raw.dcm",
]


# Both ways of reading: the walk that keeps only the naming elements, and pydicom's full parse.
READERS = {"walk": naming_tags(Template.parse(DEFAULT_TEMPLATE)), "full": None}


@pytest.mark.parametrize("reader", READERS)
def test_every_real_file_reads_in_every_transfer_syntax(testdata, expected, reader):
    for rel, fields in expected.items():
        dicom = read_dicom(str(testdata / rel), READERS[reader])
        try:
            assert dicom.sha256 == fields["sha256"], rel
            assert dicom.size == fields["size"]
            assert dicom.ds.file_meta.TransferSyntaxUID == fields["TransferSyntaxUID"]
            for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
                            "InstanceNumber", "EchoNumbers"):
                value = dicom.ds.get(keyword)
                assert (None if value is None else value) == fields[keyword], (rel, keyword)
            assert dicom.complete_header == (reader == "full")
            assert "PixelData" not in dicom.ds  # the header only
        finally:
            dicom.close()


def _boundaries(data: bytes) -> set[int]:
    """Start and end of every top-level element, as pydicom reads them."""
    stream = io.BytesIO(data)
    ds = dcmread(stream, stop_before_pixels=True)
    implicit, little = ds.original_encoding
    start = ds.file_meta.get("FileMetaInformationGroupLength") + 144
    stream.seek(start)
    cuts = {start}
    for elem in data_element_generator(stream, implicit, little, defer_size=0):
        value_tell = getattr(elem, "value_tell", None) or elem.file_tell
        cuts.add(value_tell)
        if getattr(elem, "length", 0xFFFFFFFF) != 0xFFFFFFFF:
            cuts.add(value_tell + elem.length)
        else:
            cuts.add(stream.tell())
    return cuts


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("rel", SAMPLES)
def test_no_truncated_copy_is_accepted(tmp_path, testdata, rel, reader):
    data = (testdata / rel).read_bytes()
    sop_class = dcmread(io.BytesIO(data), stop_before_pixels=True).SOPClassUID.name
    detectable_between_elements = "Image Storage" in sop_class or "Spectroscopy" in sop_class
    rng = random.Random(rel)
    cuts = set(rng.sample(range(1, len(data)), 150)) | set(range(len(data) - 16, len(data)))
    cuts |= set(range(0, 400, 7))  # preamble, file meta, first elements
    boundaries = _boundaries(data)
    if detectable_between_elements:
        cuts |= boundaries
    else:  # a cut exactly between two elements of a non-image object looks whole: a known limit
        cuts -= boundaries
    cuts.discard(len(data))
    path = tmp_path / "cut.dcm"
    accepted, misnamed = [], []
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        try:
            read_dicom(str(path), READERS[reader]).close()
            accepted.append(cut)
        except Incomplete:
            pass
        except Rejected as exc:
            if cut > 600:  # past the file meta, the reason must say the file is short
                misnamed.append((cut, str(exc)))
    assert not accepted, f"{len(accepted)} of {len(cuts)} truncated copies accepted, first at {accepted[:5]}"
    assert not misnamed


@pytest.mark.parametrize("reader", READERS)
def test_reasons_are_one_readable_line(tmp_path, testdata, reader):
    data = (testdata / SAMPLES[0]).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(Incomplete) as caught:
        read_dicom(str(path), READERS[reader])
    assert str(caught.value) == (
        f"element (7FE0,0010) declares 8192 bytes at byte {len(data) - 8192}, "
        f"but the file ends at byte {len(data) - 1000}"
    )


def test_not_dicom_empty_and_headerless_files_are_rejected(tmp_path, template_file):
    cases = {
        "empty": (b"", Incomplete, "empty file (0 bytes)"),
        "short": (b"\0" * 100, Incomplete, "only 100 bytes"),
        "text": (b"hello " * 100, Rejected, "not a DICOM file (no 'DICM' marker at byte 128)"),
        "garbage-after-marker": (b"\0" * 128 + b"DICM" + os.urandom(2000), Rejected, ""),
    }
    for name, (content, kind, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(kind) as caught:
            read_dicom(str(path))
        assert reason in str(caught.value)
    no_uid = make_dicom(tmp_path / "no-uid.dcm", template_file, SOPInstanceUID=None)
    dicom = read_dicom(str(no_uid))  # readable; the chain rejects it for the missing UID
    assert "SOPInstanceUID" not in dicom.ds
    dicom.close()


def test_symlinks_fifos_and_sockets_are_not_read(tmp_path, template_file):
    target = make_dicom(tmp_path / "real.dcm", template_file)
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        for name, reason in (("link", "a symbolic link: not followed"), ("fifo", "a FIFO, not a file"),
                             ("sock", "a socket, not a file")):
            with pytest.raises(NotRegular, match=reason):
                read_dicom(str(tmp_path / name))
    finally:
        server.close()


def test_same_data_set_compares_the_data_set_and_its_transfer_syntax_not_the_file_meta(tmp_path, template_file):
    first = make_dicom(tmp_path / "a", template_file, InstanceNumber=1)
    ds = dcmread(first)
    ds.file_meta.SourceApplicationEntityTitle = "PACS"  # a re-send: another file meta
    ds.save_as(tmp_path / "b", enforce_file_format=False)
    ds.ImageComments = "changed"
    ds.save_as(tmp_path / "c", enforce_file_format=False)
    ds = dcmread(first)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"  # the same bytes, labelled otherwise
    ds.save_as(tmp_path / "d", enforce_file_format=False)
    at = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def placed(name: str) -> Placed:
            return Placed(at, name)

        assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()
        assert same_data_set(placed("a"), placed("b")) is True
        assert same_data_set(placed("a"), placed("c")) is False
        assert same_data_set(placed("a"), placed("d")) is False
        assert same_data_set(placed("a"), placed("missing")) is None
        st = os.stat(tmp_path / "b")
        proven = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        assert same_data_set(placed("a"), Placed(at, "b", proven)) is True
        assert same_data_set(placed("a"), Placed(at, "b", (*proven[:3], proven[3] + 1))) is None  # not that file
        data = (tmp_path / "b").read_bytes()
        in_memory = Placed(-1, "", identity=data_set_identity(data, len(data))[0])  # a dry run's rewritten bytes
        assert same_data_set(placed("a"), in_memory) is True
        assert same_data_set(placed("c"), in_memory) is False
    finally:
        os.close(at)
