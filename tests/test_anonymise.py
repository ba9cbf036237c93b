"""Anonymisation by PS3.15 profile layers: the rule files, the engine, and the whole chain on
the real scanner files."""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from dumpwatch.anonymise import Anonymiser, leak
from dumpwatch.errors import ConfigError, Rejected
from dumpwatch.keys import load_key, new_uid
from dumpwatch.rules import RESOLVED, RULES_DIR, load_layer, load_profile

from helpers import FIELDMAP, REPO, below, copy_testdata, make_dicom, run, tree_of

TABLE_FILE = REPO / "rules" / "standard" / "confidentiality_profile_attributes.json"  # PS3.15 E.1-1
TABLE = json.loads(TABLE_FILE.read_text())
KEY = bytes(range(32))
OPTIONS = {  # layer file -> the table's column
    "retain-long-full-dates": "rtnLongFullDatesOpt",
    "retain-long-modified-dates": "rtnLongModifDatesOpt",
    "retain-patient-chars": "rtnPatCharsOpt",
    "retain-device-id": "rtnDevIdOpt",
    "retain-institution-id": "rtnInstIdOpt",
    "retain-uids": "rtnUIDsOpt",
    "retain-safe-private": "rtnSafePrivOpt",
    "clean-descriptors": "cleanDescOpt",
    "clean-structured-content": "cleanStructContOpt",
    "clean-graphics": "cleanGraphOpt",
}
AUDIT = {"PatientName", "PatientID", "PatientIdentityRemoved", "DeidentificationMethod",
         "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified"}
SUBJECT = "Doe^Jane"
RANGES = (0x50000005, 0x60003000, 0x60004000)  # instances of (50xx,xxxx), (60xx,3000), (60xx,4000)
DUMMIES = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y", "DS": "0", "IS": "0"}


def profile(*names: str):
    return load_profile(list(names), RULES_DIR, REPO)


# -- the rule files ---------------------------------------------------------------------------


def test_the_shipped_layers_are_what_the_generator_makes_of_the_table(tmp_path):
    """rules/ holds the script's output for the 2024e table, unedited."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_profile_layers.py"),
                             str(TABLE_FILE),
                             str(tmp_path)], capture_output=True, text=True, check=True)
    assert "621 rows" in result.stdout
    made = sorted(p.name for p in tmp_path.glob("*.toml"))
    assert made == sorted(["basic.toml", *(f"{name}.toml" for name in OPTIONS)])
    for name in made:
        assert (tmp_path / name).read_text() == (RULES_DIR / name).read_text(), name


def test_the_basic_layer_holds_every_row_of_the_table():
    basic = load_layer(RULES_DIR / "basic.toml")
    assert basic.edition == "2024e" and basic.code == "113100"
    rows = {int(r["tag"][1:5] + r["tag"][6:10], 16): r["basicProfile"] for r in TABLE
            if all(c in "0123456789ABCDEF" for c in (r["tag"][1:5] + r["tag"][6:10]).upper())}
    assert len(rows) == 617  # and three ranges and the private elements: 621 rows
    assert basic.actions == rows
    # The ranges: curves, overlay data and comments; and every private element.
    assert sorted(basic.masks) == sorted([(0xFF000000, 0x50000000, "X"), (0xFF00FFFF, 0x60003000, "X"),
                                          (0xFF00FFFF, 0x60004000, "X")])
    assert basic.private_default == "X"


def test_every_shipped_layer_loads_and_check_rules_accepts_them(tmp_path):
    for path in RULES_DIR.glob("*.toml"):
        load_layer(path)
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text("dir_out = out\nanon_profile = basic, retain-long-modified-dates, clean-descriptors, "
                   "retain-safe-private, site\n")
    result = run("--config", str(cfg), "check-rules")
    assert result.exit_code == 0, result.output
    assert "ok  basic.toml" in result.output and "ok  site.toml" in result.output
    for code in ("113100", "113107", "113105", "113111"):  # what this profile applies fully
        assert f"fully applied: {code}" in result.output


@pytest.mark.parametrize(
    "text, line, key, message",
    [
        ('[actions]\nPatientsName = "X"\n', 2, "PatientsName", "neither a DICOM keyword nor a tag"),
        ('[actions]\nPatientName = "Q"\n', 2, "PatientName", "unknown action 'Q'"),
        ('[actions]\n"(0010,001G)" = "X"\n', 2, "(0010,001G)", "neither a DICOM keyword nor a tag"),
        ('[actions]\n"(0019,100C)" = "K"\n', 2, "(0019,100C)", "a private element: name it in a [private"),
        ('[private."SIEMENS MR HEADER"]\n"(0018,xx0C)" = "K"\n', 2, "(0018,xx0C)", "gggg odd"),
        ('[layer]\nname = "x"\ncolour = "red"\n', 3, "colour", "unknown key in [layer]"),
        ('[actoins]\n', 1, "actoins", "unknown table"),
    ],
)
def test_a_rule_file_mistake_names_file_line_and_key(tmp_path, text, line, key, message):
    path = tmp_path / "mine.toml"
    path.write_text("# a site layer\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_layer(path)
    assert str(caught.value).startswith(f"{path}:{line + 1}: {key}: "), str(caught.value)
    assert message in str(caught.value)
    # At start-up (any command reads the configuration), and by check-rules.
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text(f"dir_out = out\nanon_profile = basic, {path}\n")
    result = run("--config", str(cfg), "check-config")
    assert result.exit_code == 1 and f"{path}:{line + 1}: {key}: " in result.output
    bad_dir = tmp_path / "rules"
    bad_dir.mkdir()
    (bad_dir / "mine.toml").write_text(path.read_text())
    cfg.write_text(f"dir_out = out\nrules_dir = {bad_dir}\n")
    result = run("--config", str(cfg), "check-rules")
    assert result.exit_code == 1 and f"{bad_dir / 'mine.toml'}:{line + 1}: {key}: " in result.output


def test_a_profile_naming_a_missing_layer_is_refused(tmp_path):
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text("dir_out = out\nanon_profile = basic, retain-everything\n")
    result = run("--config", str(cfg), "check-config")
    assert result.exit_code == 1
    assert f"{cfg}:2: anon_profile: no rule layer 'retain-everything'" in result.output


# -- the engine, element by element --------------------------------------------------------


def _value(vr: str, number: int) -> object:
    return {
        "PN": f"Doe^Jane^Q{number}", "DA": "20200115", "DT": "20200115103000", "TM": "103000",
        "UI": f"1.2.826.0.1.3680043.10.999.{number}", "AS": "034Y", "CS": f"CS{number}", "DS": "1.5", "IS": "7",
        "AE": f"AE{number}", "UR": f"http://example.org/{number}", "US": 3, "SS": 3, "UL": 3, "SL": 3,
        "FL": 1.5, "FD": 1.5, "OB": b"\x01\x02", "OW": b"\x01\x02", "UN": b"\x01\x02",
    }.get(vr, f"text {number} of Jane Doe")


def table_dataset() -> Dataset:
    """One element for each row of the table, with a value of its VR; a sequence holds one
    item with a UID and a text in it; plus a curve, overlay data and comments, and private
    elements of two creators."""
    with pydicom_config.disable_value_validation():
        return _table_dataset()


def _table_dataset() -> Dataset:
    ds = Dataset()
    for number, row in enumerate(TABLE):
        digits = row["tag"][1:5] + row["tag"][6:10]
        if not all(c in "0123456789ABCDEF" for c in digits.upper()) or digits.startswith(("0000", "0002")):
            continue
        tag = int(digits, 16)
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr == "SQ":
            item = Dataset()
            item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.998.{number}"
            item.CodeMeaning = "inside a sequence"
            ds.add_new(tag, "SQ", Sequence([item]))
        else:
            ds.add_new(tag, vr, _value(vr, number))
    ds.PatientName = SUBJECT
    ds.PatientID = "P-20200115-77"
    ds.SOPClassUID = MRImageStorage  # well known: never replaced
    ds.add_new(0x50000005, "US", 2)  # (50xx,xxxx) Curve Dimensions
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # (60xx,3000) Overlay Data
    ds.add_new(0x60004000, "LT", "overlay note by Jane")  # (60xx,4000) Overlay Comments
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x0019100C, "IS", "1000")  # B_value
    ds.add_new(0x00191008, "CS", "IMAGE NUM 4")
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291010, "OB", b"SV10\x04\x03\x02\x01")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "SCANNER_7T"
    return ds


def anonymised(*names: str, key: bytes = KEY, ds: Dataset | None = None) -> tuple[Dataset, Dataset]:
    original = ds if ds is not None else table_dataset()
    out = copy.deepcopy(original)
    Anonymiser(profile(*names), key).apply(out)
    return original, out


def _days() -> int:
    from dumpwatch.keys import day_shift

    return day_shift(KEY, "P-20200115-77")


def assert_action(original: Dataset, out: Dataset, tag: int, action: str, uids_new: bool = True) -> None:
    """The element after anonymising is what `action` (resolved) makes of the original."""
    name = keyword_for_tag(tag) or f"{tag:08X}"
    elem = original[tag]
    vr = elem.VR
    action = RESOLVED.get(action, action)
    if action == "X":
        assert tag not in out, name
        return
    assert tag in out, f"{name} ({action}) was removed"
    value = out[tag].value
    if vr == "SQ":
        if action == "Z":
            assert len(value) == 0, name
        else:  # K, D, C, U, R (X/Z/U*): the structure stays, and what is inside is cleaned
            # by its own rules ("K - keep (unchanged for non-Sequence Attributes, cleaned
            # for Sequences)", the table's legend): the UIDs inside are new (but with retain-uids)
            inside = value[0].ReferencedSOPInstanceUID if len(value) == 1 else None
            assert inside == elem.value[0].ReferencedSOPInstanceUID if not uids_new else inside.startswith("2.25."), \
                name
        return
    if action == "K":
        assert value == elem.value, name
    elif action == "Z":
        assert out[tag].is_empty, name
    elif action == "U" or vr == "UI":
        assert str(value).startswith("2.25.") and value != elem.value, name
    elif action == "D":
        assert value != elem.value and value == out[tag].value, name
        if vr in DUMMIES:
            assert value == DUMMIES[vr], name
    elif action == "C":
        if vr in ("DA", "DT"):
            shifted = datetime.date(2020, 1, 15) - datetime.timedelta(days=_days())
            assert value == shifted.strftime("%Y%m%d") + str(elem.value)[8:], name
        elif vr == "TM":
            assert value == elem.value, name
        elif vr in ("LO", "LT", "SH", "ST", "UC", "UT", "CS", "AE", "UR"):
            assert "Jane" not in str(value) and "Doe" not in str(value), name
            assert set(str(value).split()) <= set(str(elem.value).split()), name  # words cut, none added
        else:
            assert value != elem.value, name
    else:
        raise AssertionError(f"{name}: unexpected action {action}")


def _rows(column: str) -> dict[int, str]:
    rows = {}
    for row in TABLE:
        digits = row["tag"][1:5] + row["tag"][6:10]
        if column in row and all(c in "0123456789ABCDEF" for c in digits.upper()) and not digits.startswith(
                ("0000", "0002")):
            rows[int(digits, 16)] = row[column]
    return rows


def test_the_basic_profile_does_what_the_table_says_to_each_element():
    original, out = anonymised("basic")
    rows = _rows("basicProfile")
    for tag, action in rows.items():
        if keyword_for_tag(tag) not in AUDIT:
            assert_action(original, out, tag, action)
    for tag in (0x50000005, 0x60003000, 0x60004000, 0x00190010, 0x0019100C, 0x00191008, 0x00290010, 0x00291010):
        assert tag not in out, f"{tag:08X}"
    assert out.SOPClassUID == MRImageStorage
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != original.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta
    code = out.PatientName
    assert str(code).startswith("SUBJ") and out.PatientID == code


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_changes_exactly_what_its_column_says(option):
    original, basic = anonymised("basic")
    _, out = anonymised("basic", option)
    column = _rows(OPTIONS[option])
    for tag in original.keys():
        name = keyword_for_tag(tag)
        if name in AUDIT or tag >> 16 == 2 or tag in RANGES:
            continue
        if tag in column:
            assert_action(original, out, tag, column[tag], uids_new=option != "retain-uids")
        else:
            assert (tag in out) == (tag in basic), name or f"{tag:08X}"
            if tag in out:  # a sequence: but for the elements inside that the option governs
                assert _without(out[tag].value, column) == _without(basic[tag].value, column), \
                    name or f"{tag:08X}"
    if option == "clean-graphics":  # the ranges: curves, overlays
        assert 0x50000005 in out and 0x60003000 in out and 0x60004000 in out
        assert "Jane" not in out[0x60004000].value
    if option == "retain-safe-private":
        # Kept are only the private elements a site declares safe (Table E.3.10-1 is not
        # shipped): with none declared, every private element still goes.
        assert not [t for t in out.keys() if t >> 16 & 1]


def _without(value: object, tags: dict[int, str]) -> object:
    if isinstance(value, Sequence):
        return [{t: _without(item[t].value, tags) for t in item.keys() if t not in tags} for item in value]
    return value


def test_the_audit_names_only_what_was_fully_applied():
    _, out = anonymised("basic", "retain-long-modified-dates", "clean-descriptors")
    assert out.PatientIdentityRemoved == "YES"
    assert list(out.DeidentificationMethod) == ["dumpwatch: basic", "dumpwatch: retain-long-modified-dates",
                                                "dumpwatch: clean-descriptors"]
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100", "113107", "113105"]
    assert all(i.CodingSchemeDesignator == "DCM" for i in out.DeidentificationMethodCodeSequence)
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    _, out = anonymised("basic")
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    # A site layer that keeps what the Basic Profile removes: the Basic Profile is not claimed.
    _, out = anonymised("basic", str(RULES_DIR / "site.toml"))
    assert "DeidentificationMethodCodeSequence" not in out  # 1C: DeidentificationMethod says it in words
    assert list(out.DeidentificationMethod) == ["dumpwatch: basic", "dumpwatch: site"]


def test_combined_codes_resolve_as_documented():
    """X/Z -> Z (the element stays, empty), Z/D X/D X/Z/D -> D (a dummy), X/Z/U* -> the
    sequence stays with new UIDs inside."""
    original, out = anonymised("basic")
    assert out["AcquisitionDate"].is_empty  # X/Z
    assert out.ContentDate == "19000101"  # Z/D
    assert out.SeriesDate == "19000101"  # X/D
    assert out.InstanceCreationTime == "000000"  # X/Z/D
    references = out.ReferencedImageSequence  # X/Z/U*
    assert len(references) == 1
    assert references[0].ReferencedSOPInstanceUID.startswith("2.25.")
    assert references[0].CodeMeaning == "inside a sequence"


def test_new_uids_are_consistent_irreversible_and_keyed():
    original, first = anonymised("basic")
    _, again = anonymised("basic")
    _, other_key = anonymised("basic", key=bytes(32))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert first[keyword].value == again[keyword].value, keyword
        assert first[keyword].value != other_key[keyword].value, keyword
        assert first[keyword].value.startswith("2.25.") and len(first[keyword].value) <= 64
        assert int(first[keyword].value[5:]) < 2**128
    # Another file of the same study: the same new study UID, its own new SOP instance UID.
    second = table_dataset()
    second.SOPInstanceUID = "1.2.826.0.1.3680043.10.999.123456"
    _, out = anonymised("basic", ds=second)
    assert out.StudyInstanceUID == first.StudyInstanceUID and out.SOPInstanceUID != first.SOPInstanceUID


def test_modified_dates_move_every_date_of_a_subject_by_the_same_whole_days():
    ds = table_dataset()
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDateTime = "20200115", "20200117", "20200118093000.5"
    ds.StudyTime, ds.PatientBirthDate = "101500", "19800229"
    _, out = anonymised("basic", "retain-long-modified-dates", "retain-patient-chars", ds=ds)

    def day(text: str) -> datetime.date:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    shift = day("20200115") - day(out.StudyDate)
    assert shift.days == _days() and 1 <= shift.days <= 3650
    assert day(out.SeriesDate) - day(out.StudyDate) == datetime.timedelta(days=2)  # intervals survive
    assert out.AcquisitionDateTime[8:] == "093000.5" and day(out.AcquisitionDateTime) == day("20200118") - shift
    assert out.StudyTime == "101500"  # whole days: times stay
    other = table_dataset()
    other.PatientID = "P-other"
    _, elsewhere = anonymised("basic", "retain-long-modified-dates", ds=other)
    assert elsewhere.PatientName != out.PatientName


def test_a_pseudonym_map_names_subjects_and_refuses_strangers():
    ds = table_dataset()
    anonymiser = Anonymiser(profile("basic"), KEY, {"P-20200115-77": "sub-01"})
    anonymiser.apply(ds)
    assert ds.PatientName == "sub-01" and ds.PatientID == "sub-01"
    stranger = table_dataset()
    stranger.PatientID = "P-unknown"
    stranger.PatientName = "Roe^Richard"
    with pytest.raises(Rejected, match="subject not in the pseudonym map"):
        anonymiser.apply(stranger)
    by_name = Anonymiser(profile("basic"), KEY, {"Roe^Richard": "sub-02"})
    stranger = table_dataset()
    stranger.PatientID, stranger.PatientName = "", "Roe^Richard"
    by_name.apply(stranger)
    assert stranger.PatientID == "sub-02"


def test_burned_in_annotation_is_refused_unless_allowed():
    ds = table_dataset()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(Rejected, match="BurnedInAnnotation is YES"):
        Anonymiser(profile("basic"), KEY).apply(copy.deepcopy(ds))
    Anonymiser(profile("basic"), KEY, allow_burned_in=True).apply(ds)


def test_the_site_layer_keeps_siemens_diffusion_fields_and_their_creator():
    original, out = anonymised("basic", "retain-safe-private", str(RULES_DIR / "site.toml"))
    assert out[0x0019100C].value == "1000"  # B_value, by creator and offset
    assert out[0x00190010].value == "SIEMENS MR HEADER"  # its block's creator stays
    assert 0x00191008 not in out  # not named: removed
    assert 0x00290010 not in out and 0x00291010 not in out  # a block with nothing kept goes whole
    assert out.SeriesDescription == original.SeriesDescription.replace("Jane", "").replace("Doe", "").strip() or \
        "Jane" not in out.SeriesDescription
    # The same offset in a block another creator holds is another element: removed.
    other = table_dataset()
    other[0x00190010].value = "SOMEONE ELSE"
    _, out = anonymised("basic", "retain-safe-private", str(RULES_DIR / "site.toml"), ds=other)
    assert 0x0019100C not in out


def test_the_legacy_list_loads_as_a_layer_that_empties(tmp_path):
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text("dir_out = out\nanon_profile = basic, retain-patient-chars\nanon_fields\n    0010,1010\n")
    from dumpwatch.config import read_config

    loaded = read_config(cfg)
    assert loaded.profile is not None and [layer.name for layer in loaded.profile.layers][-1] == "anon_fields"
    ds = table_dataset()
    Anonymiser(loaded.profile, KEY).apply(ds)
    assert ds["PatientAge"].is_empty  # kept by retain-patient-chars, emptied by anon_fields
    assert ds.PatientSex == table_dataset().PatientSex


# -- the whole chain on real scanner files -----------------------------------------------------


def originals(expected: dict) -> set[bytes]:
    """Identifying values of the real files, to look for in paths and bytes."""
    found = set()
    for meta in expected.values():
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if meta.get(key):
                found.add(meta[key].encode())
        if meta.get("PatientID") and len(meta["PatientID"]) >= 4:
            found.add(meta["PatientID"].encode())
    return found


def sort_with_profile(tmp_path: Path, testdata: Path, name: str, profile_line: str, key: Path, only: str = ""):
    source = tmp_path / f"{name}-dump"
    copy_testdata(testdata, source, only)
    out = tmp_path / f"{name}-sorted"
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(f"dir_out = {out}\ndir_quarantine = {tmp_path / (name + '-q')}\nanon_profile = {profile_line}\n"
                   f"anon_key = {key}\nworkers = 2\n")
    result = run("--config", str(cfg), "sort-once", str(source))
    return result, out


def test_the_basic_profile_on_every_real_file(tmp_path, testdata, expected):
    key = tmp_path / "site.key"
    result, out = sort_with_profile(tmp_path, testdata, "a", "basic, retain-long-modified-dates", key)
    assert result.exit_code == 0, result.output
    assert f"sorted      {len(expected):>7}" in result.output
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    tree = tree_of(out)
    assert len(tree) == len(expected)
    # One new SeriesInstanceUID per series folder, and one folder per original series.
    series_of_folder: dict[str, set[str]] = {}
    for rel in tree:
        ds = dcmread(out / rel)  # pydicom reads every output, pixel data and all
        _ = ds.PixelData if "PixelData" in ds else None
        series_of_folder.setdefault(os.path.dirname(rel), set()).add(str(ds.SeriesInstanceUID))
        assert ds.PatientIdentityRemoved == "YES"
    assert all(len(uids) == 1 and next(iter(uids)).startswith("2.25.") for uids in series_of_folder.values())
    # The files fall into folders exactly as they do without anonymising. The key maps each
    # original SOPInstanceUID to its new one, so each output is traced to its source.
    secret = load_key(key)
    copy_testdata(testdata, tmp_path / "plain-dump")
    assert run("sort-once", str(tmp_path / "plain-dump"), "--out", str(tmp_path / "plain")).exit_code == 0

    def folders(tree: Path, sop_of) -> set[frozenset[str]]:
        grouped: dict[str, set[str]] = {}
        for rel in tree_of(tree):
            sop = str(dcmread(tree / rel, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            grouped.setdefault(os.path.dirname(rel), set()).add(sop_of(sop))
        return {frozenset(sops) for sops in grouped.values()}

    back = {new_uid(secret, m["SOPInstanceUID"]): m["SOPInstanceUID"] for m in expected.values()}
    assert folders(out, back.__getitem__) == folders(tmp_path / "plain", str)
    # Siemens field map echoes still sort apart: each instance number twice, once per echo.
    rel_of = {str(dcmread(out / rel, stop_before_pixels=True).SOPInstanceUID): rel for rel in tree}
    fieldmap = [rel_of[new_uid(secret, m["SOPInstanceUID"])] for m in below(expected, FIELDMAP).values()]
    assert len(set(fieldmap)) == len(fieldmap) and len({os.path.dirname(rel) for rel in fieldmap}) == 1
    echo_2 = [m for m in below(expected, FIELDMAP).values() if m["EchoNumbers"] == 2]
    assert sum(rel.endswith("_02.dcm") for rel in fieldmap) == len(echo_2) == len(fieldmap) // 2 > 0
    # No original identifier in any path or any byte of the tree (found independently of
    # dumpwatch's own leak check).
    needles = originals(expected)
    for rel in tree:
        data = (out / rel).read_bytes()
        for needle in needles:
            assert needle not in rel.encode(), (rel, needle)
            assert needle not in data, (rel, needle)
    # Nor in the journal.
    journal = (out / ".dumpwatch" / "journal.sqlite3").read_bytes()
    wal = out / ".dumpwatch" / "journal.sqlite3-wal"
    journal += wal.read_bytes() if wal.exists() else b""
    assert [n for n in needles if n in journal] == []
    # Again, from a fresh copy with the same key: byte for byte the same tree.
    result, again = sort_with_profile(tmp_path, testdata, "b", "basic, retain-long-modified-dates", key)
    assert result.exit_code == 0, result.output
    assert tree_of(again) == tree
    # Another key: other UIDs and pseudonyms.
    result, other = sort_with_profile(tmp_path, testdata, "c", "basic, retain-long-modified-dates",
                                      tmp_path / "other.key", FIELDMAP)
    assert result.exit_code == 0, result.output
    assert not set(tree_of(other)) & set(tree)


def test_the_leak_check_quarantines_a_file_that_keeps_an_original(tmp_path, template_file):
    """A site layer that keeps a text holding the subject's name: the check finds it."""
    layer = tmp_path / "careless.toml"
    layer.write_text('[layer]\nname = "careless"\n[actions]\nImageComments = "K"\n')
    source = tmp_path / "dump"
    make_dicom(source / "MR.1", template_file, PatientName="Hopper^Grace", ImageComments="scan of Hopper")
    make_dicom(source / "MR.2", template_file, PatientName="Hopper^Grace", ImageComments="all fine",
               InstanceNumber=2)
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text(f"dir_out = out\ndir_quarantine = q\nanon_profile = basic, {layer}\nworkers = 1\n"
                   f"fname_log = dumpwatch.log\n")
    result = run("--config", str(cfg), "sort-once", str(source))
    assert result.exit_code == 3, result.output
    # Quarantined under a keyed name (the journal names it so); its reason file says which it was.
    [reason_file] = (tmp_path / "q").glob("*.reason.txt")
    assert reason_file.name.startswith("ANON-")
    lines = reason_file.read_text().splitlines()
    assert lines[0] == "leak check: the original value of PatientName is still in the anonymised file"
    assert lines[1] == f"file: {source / 'MR.1'}"
    assert len(tree_of(tmp_path / "out")) == 1
    log = (tmp_path / "dumpwatch.log").read_bytes()
    journal = (tmp_path / "out" / ".dumpwatch" / "journal.sqlite3").read_bytes()
    for where in (log, journal):
        assert b"Hopper" not in where


@pytest.mark.parametrize(
    "data, needle, kind, found",
    [
        (b"LO\x0c\x00scan of HOPPER", b"Hopper", "text", True),  # any case
        (b"HopperGrace", b"Hopper", "text", False),  # inside a longer word
        (b"t1_Hopper_mprage", b"Hopper", "text", True),  # underscores join words, not names
        (b"1.2.3.45.6", b"1.2.3.4", "uid", False),  # the start of another UID
        (b"\x001.2.3.4\x00", b"1.2.3.4", "uid", True),
        (b"DT20200115103000", b"20200115", "date", True),  # a DT's date
        (b"120200115", b"20200115", "date", False),  # inside a longer number
    ],
)
def test_the_leak_check_finds_whole_values_only(data, needle, kind, found):
    assert leak(data, [("Element", needle, kind)]) == ("Element" if found else None)


def test_legacy_anon_fields_alone_still_empty_only_their_fields(tmp_path, template_file):
    source = tmp_path / "dump"
    make_dicom(source / "MR.1", template_file, PatientName="Hopper^Grace", PatientBirthDate="19061209")
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text("dir_out = out\nanon_fields\n    0010,0030\n")
    result = run("--config", str(cfg), "sort-once", str(source))
    assert result.exit_code == 0, result.output
    [rel] = tree_of(tmp_path / "out")
    ds = dcmread(tmp_path / "out" / rel)
    assert ds.PatientBirthDate == "" and ds.PatientName == "Hopper^Grace"
    assert "PatientIdentityRemoved" not in ds
    assert not (tmp_path / "out" / ".dumpwatch" / "anon.key").exists()


def test_a_quarantined_subject_is_sorted_once_the_map_names_it(tmp_path, template_file):
    source = tmp_path / "dump"
    make_dicom(source / "MR.1", template_file, PatientID="P-new")
    subjects = tmp_path / "subjects.csv"
    subjects.write_text("PatientID,subject\nP-old,sub-01\n")
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text(f"dir_out = out\ndir_quarantine = q\nanon_profile = basic\nanon_subjects = {subjects}\n")
    result = run("--config", str(cfg), "sort-once", str(source))
    assert result.exit_code == 3
    [reason_file] = (tmp_path / "q").glob("*.reason.txt")
    assert reason_file.read_text().startswith("subject not in the pseudonym map")
    subjects.write_text("PatientID,subject\nP-old,sub-01\nP-new,sub-02\n")
    result = run("--config", str(cfg), "sort-once", str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    [rel] = tree_of(tmp_path / "out")
    assert "-sub-02/" in rel
    assert hashlib.sha256((tmp_path / "out" / rel).read_bytes()).hexdigest()


def test_where_finds_an_anonymised_file_by_its_original_name_and_uid(tmp_path, template_file):
    source = tmp_path / "dump"
    original = make_dicom(source / "MR.1", template_file, PatientName="Hopper^Grace")
    uid = str(dcmread(original).SOPInstanceUID)
    cfg = tmp_path / "dumpwatch.cfg"
    cfg.write_text("dir_out = out\nanon_profile = basic\n")
    assert run("--config", str(cfg), "sort-once", str(source)).exit_code == 0
    [rel] = tree_of(tmp_path / "out")
    for term in ("MR.1", str(source / "MR.1"), uid, str(tmp_path / "out" / rel)):
        result = run("--config", str(cfg), "where", term)
        assert result.exit_code == 0, (term, result.output)
        assert "sorted  ANON-" in result.output and result.output.rstrip().endswith(str(tmp_path / "out" / rel))
        assert "MR.1" not in result.output.replace(term, "") and uid not in result.output.replace(term, "")
