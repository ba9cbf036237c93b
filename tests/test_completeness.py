"""Completeness alone: instance numbers as ranges, gaps, verdicts (completeness.py), and the
facts the workers read from real scanner files (facts.py)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from pydicom import dcmread

from dumpwatch import completeness as c
from dumpwatch.dicomfile import read_dicom
from dumpwatch.facts import FACT_TAGS, facts_of
from dumpwatch.naming import DEFAULT_TEMPLATE, Template, naming_tags

from helpers import FIELDMAP, make_dicom


def ranges_of(numbers: set[int]) -> list[tuple[int, int]]:
    result: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if result and result[-1][1] == n - 1:
            result[-1] = (result[-1][0], n)
        else:
            result.append((n, n))
    return result


def test_ranges_match_a_set_whatever_the_order_numbers_come_in():
    rng = random.Random(12)
    for _ in range(300):
        numbers = [rng.randint(-5, 60) for _ in range(rng.randint(0, 80))]
        ranges: list[tuple[int, int]] = []
        seen: set[int] = set()
        for n in numbers:
            ranges, there = c.add(ranges, n)
            assert there == (n in seen)
            seen.add(n)
        assert ranges == ranges_of(seen)
        assert c.count(ranges) == len(seen)
        if seen:
            full = set(range(min(seen), max(seen) + 1))
            assert c.gaps(ranges) == ranges_of(full - seen)
            assert c.gaps(ranges, 1, 50) == ranges_of(set(range(1, 51)) - seen)


def test_shown_as_a_person_reads_them():
    assert c.shown([(1, 6), (8, 8), (10, 12)]) == "1-6, 8, 10-12"


def G(echo, *ranges):
    return c.Group(echo, list(ranges))


def test_siemens_echoes_numbered_each_from_one_are_judged_per_echo():
    verdict = c.judge([G(1, (1, 36)), G(2, (1, 6), (8, 36))], 36, True)
    assert verdict.per_echo and verdict.verdict == c.INCOMPLETE
    assert verdict.missing == {2: [(7, 7)]} and verdict.summary() == "missing 1 (echo 2: 7)"
    assert c.judge([G(1, (1, 36)), G(2, (1, 36))], 36, True).verdict == c.WHOLE


def test_numbers_running_on_across_echoes_are_judged_over_the_series():
    """Philips and GE number every image of a series once, whatever its echo."""
    verdict = c.judge([G(1, (1, 1), (3, 3), (5, 6)), G(2, (2, 2), (4, 4))], None, False)
    assert not verdict.per_echo and verdict.verdict == c.NO_EXPECTATION
    assert c.judge([G(1, (1, 1), (5, 6)), G(2, (2, 2), (4, 4))], None, False).summary() == "missing 1 (3)"


def test_an_expected_count_names_the_missing_last_images():
    assert c.judge([G(1, (1, 12))], 14, False).summary() == "missing 2 (13-14)"
    assert c.judge([G(1, (1, 14))], 14, False).verdict == c.WHOLE
    # numbers that do not start at 1: the count says how many, not which
    odd = c.judge([G(0, (101, 110))], 12, False)
    assert odd.verdict == c.INCOMPLETE and odd.missing_count == 2 and odd.missing == {}


def test_without_an_expectation_gaps_still_tell():
    assert c.judge([G(0, (1, 12))], None, False).verdict == c.NO_EXPECTATION
    lacking = c.judge([G(0, (1, 6), (8, 12))], None, False)
    assert lacking.verdict == c.INCOMPLETE and lacking.summary() == "missing 1 (7)"


def test_frame_sets_decide_for_enhanced_files():
    assert c.judge([G(0, (1, 1))], None, False, c.Frames(2, 0)).verdict == c.WHOLE
    lacking = c.judge([G(0, (1, 1))], None, False, c.Frames(2, 3, "frame set 1 of instance 1: positions 4, 5, 6"))
    assert lacking.verdict == c.INCOMPLETE
    assert lacking.summary() == "missing 3 frames (frame set 1 of instance 1: positions 4, 5, 6)"


def test_many_gaps_are_cut_short():
    ranges = [(n, n) for n in range(1, 400, 2)]
    summary = c.judge([G(0, *ranges)], None, False).summary()
    assert summary.startswith("missing 199 (2, 4, 6") and summary.endswith(", ...)")


WANTED = naming_tags(Template.parse(DEFAULT_TEMPLATE)) | FACT_TAGS


def facts(path: Path):
    dicom = read_dicom(str(path), WANTED)  # as the workers read: only the wanted elements
    try:
        return facts_of(dicom.ds, 0)
    finally:
        dicom.close()


def test_expected_counts_from_real_scanner_files(testdata):
    siemens = facts(testdata / FIELDMAP / "e1_01.dcm")
    assert (siemens.expected, siemens.per_echo, siemens.echo, siemens.instance) == (36, True, 1, 1)
    assert "sSliceArray.lSize" in siemens.expected_from and siemens.sender == "MRC35131"
    ge = facts(next((testdata / "ge" / "6_CV_Neuro").iterdir()))
    assert (ge.expected, ge.expected_from, ge.per_echo) == (32, "ImagesInAcquisition", False)
    mosaic = facts(testdata / "transfer_syntax" / "1.dcm")  # one volume of a two-volume run
    assert (mosaic.expected, mosaic.per_echo) == (2, False) and "lRepetitions" in mosaic.expected_from
    philips = facts(next((testdata / "philips").rglob("*.dcm")))
    assert philips.expected is None and philips.sender == "DicomBrowser"


def test_frame_sets_of_real_enhanced_files(testdata):
    philips = facts(testdata / "enhanced" / "philips" / "IM_0027_fMAP.dcm")
    assert (philips.frames, philips.frame_sets, philips.frames_missing) == (64, 2, 0)
    siemens = facts(next((testdata / "enhanced" / "siemens_xa30_fieldmap").rglob("*.dcm")))
    assert (siemens.frames, siemens.frame_sets, siemens.frames_missing) == (33, 1, 0)


def test_a_frame_missing_from_an_enhanced_file_is_named(testdata, tmp_path):
    ds = dcmread(testdata / "enhanced" / "philips" / "IM_0027_fMAP.dcm")
    size = len(ds.PixelData) // int(ds.NumberOfFrames)
    del ds.PerFrameFunctionalGroupsSequence[40]  # the 9th position of the second frame set
    ds.PixelData = ds.PixelData[: 40 * size] + ds.PixelData[41 * size:]
    ds.NumberOfFrames = 63
    ds.save_as(tmp_path / "lacking.dcm")
    lacking = facts(tmp_path / "lacking.dcm")
    assert (lacking.frames, lacking.frame_sets, lacking.frames_missing) == (63, 2, 1)
    assert lacking.frames_note == "frame set 2 of instance 1: positions 9"


@pytest.mark.parametrize("number", ["1e30", "-1e30", "NaN", "inf", "x", "99999999999999"])
def test_nonsense_numbers_are_not_counted(template_file, tmp_path, number):
    path = make_dicom(tmp_path / "odd.dcm", template_file, InstanceNumber=number, EchoNumbers=number,
                      Manufacturer="GE MEDICAL SYSTEMS", ImagesInAcquisition="9" * 10)
    odd = facts(path)
    assert odd.instance is None and odd.echo is None and odd.expected is None


def test_files_without_an_instance_number_count_but_name_no_gap():
    assert c.judge([c.Group(0, [], unnumbered=12)], 12, False).verdict == c.WHOLE
    short = c.judge([c.Group(0, [], unnumbered=10)], 12, False)
    assert short.verdict == c.INCOMPLETE and short.missing_count == 2 and short.missing == {}
    assert c.judge([c.Group(0, [], unnumbered=3)], None, False).verdict == c.NO_EXPECTATION


def test_a_protocol_number_with_a_leading_zero_is_read_as_decimal(template_file, tmp_path):
    ds = dcmread(template_file)
    csa = ds[0x00291020].value
    ds[0x00291020].value = re.sub(rb"(sSliceArray\.lSize\s*=\s*)36", rb"\g<1>08", csa)
    ds.save_as(tmp_path / "odd.dcm")
    assert facts(tmp_path / "odd.dcm").expected == 8


def test_a_frame_sequence_no_reader_can_parse_leaves_no_expectation_and_no_error(testdata):
    """A file the walk proved whole, whose per-frame sequence pydicom cannot parse: sorted
    all the same, frames counted, frame sets not checked."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import BaseTag

    dicom = read_dicom(str(testdata / "enhanced" / "siemens_xa10" / "6_1.dcm"), WANTED)
    try:
        tag = BaseTag(0x52009230)  # PerFrameFunctionalGroupsSequence
        dicom.ds._dict[tag] = RawDataElement(tag, "SQ", 0xFFFFFFFF, b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
                                             b"\x20\x00\x11\x91Q?\x00\x00" + b"\x00" * 8, 0, False, True)
        damaged = facts_of(dicom.ds, 0)
    finally:
        dicom.close()
    assert damaged.frames == 6 and damaged.frame_sets == 0 and damaged.expected is None


def test_times_no_calendar_holds_are_shown_as_they_are():
    from dumpwatch.report import iso, parse_since
    assert iso(1e13) == "10000000000000.0" and iso(0) == "1970-01-01T00:00:00+00:00"
    with pytest.raises(ValueError):
        parse_since("1" + "0" * 400 + "d")
