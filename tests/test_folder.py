"""The naming rules on a picture of one series folder, without a disk: echo suffixes in any
order of arrival, DcmServer's collision suffixes, names read back per template, and which
of "<name>", "<name>_2"... a series owns."""

from __future__ import annotations

import itertools

import pytest

from dumpwatch.folder import (
    FOREIGN,
    Folder,
    Known,
    file_stem,
    folder_number,
    own_folder,
    read_back,
    series_owner,
    suffixes,
)
from dumpwatch.naming import Name

_uids = itertools.count(1)


def arrive(folder: Folder, instance: int, echo: int | None) -> tuple[str, list[tuple[str, str]]]:
    """A new file of this instance and echo comes to the folder: its name, and the renames first."""
    renames = folder.echo_renames(echo or 1, ".dcm")
    known = Known(None, 0, 0, f"1.2.{next(_uids)}", echo or 1, 100)
    return folder.new_file(Name(("phantom", "002"), f"{instance:04d}", echo), known, ".dcm"), renames


def test_file_stem_carries_the_echo_only_when_the_series_has_several():
    assert file_stem("0001", None, False) == "0001"
    assert file_stem("0001", 1, False) == "0001"
    assert file_stem("0001", 1, True) == "0001_01"
    assert file_stem("0001", 2, False) == "0001_02"  # a later echo says so even as the first file
    assert file_stem("0001", 12, True) == "0001_12"


def test_collision_suffixes_are_dcmservers_and_continue_from_a_given_one():
    assert list(itertools.islice(suffixes(), 4)) == ["", "A", "A2", "A3"]
    assert list(itertools.islice(suffixes("A"), 3)) == ["A", "A2", "A3"]
    assert list(itertools.islice(suffixes("A3"), 2)) == ["A3", "A4"]


def test_a_free_name_avoids_every_name_in_the_folder():
    folder = Folder(("phantom", "002"), None, taken={"0001.dcm", "0001A.dcm", "0002.dcm"})
    assert folder.free_name("0001", ".dcm") == ("0001A2.dcm", "A2")
    assert folder.free_name("0003", ".dcm") == ("0003.dcm", "")
    assert folder.free_name("0001_01", ".dcm", "A") == ("0001_01A.dcm", "A")


def test_a_single_echo_series_has_no_echo_suffix():
    folder = Folder(("phantom", "002"), None)
    assert [arrive(folder, n, echo) for n, echo in ((1, 1), (2, None), (3, 1))] == [
        ("0001.dcm", []), ("0002.dcm", []), ("0003.dcm", [])]
    assert not folder.multi


def test_a_second_echo_renames_the_first_echo_s_files():
    folder = Folder(("phantom", "002"), None)
    arrive(folder, 1, 1)
    arrive(folder, 2, 1)
    assert arrive(folder, 1, 2) == ("0001_02.dcm", [("0001.dcm", "0001_01.dcm"), ("0002.dcm", "0002_01.dcm")])
    assert arrive(folder, 3, 1) == ("0003_01.dcm", [])  # from now on, echo 1 says so at once
    assert arrive(folder, 2, 2) == ("0002_02.dcm", [])
    assert folder.multi and not folder.plain
    assert folder.disk == {"0001_01.dcm": "0001.dcm", "0002_01.dcm": "0002.dcm"}  # until the renames are made


@pytest.mark.parametrize("order", [*itertools.permutations((1, 2)), *itertools.permutations((1, 2, 3))],
                         ids=lambda order: "-".join(map(str, order)))
def test_echo_suffixes_are_the_same_in_any_order_of_arrival(order):
    folder = Folder(("phantom", "002"), None)
    for echo in order:
        arrive(folder, 1, echo)
    assert sorted(folder.files) == [f"0001_{echo:02d}.dcm" for echo in sorted(order)]
    assert {name: known.echo for name, known in folder.files.items()} == {
        f"0001_{echo:02d}.dcm": echo for echo in order}


def test_a_renamed_file_keeps_its_collision_suffix():
    folder = Folder(("phantom", "002"), None)
    assert arrive(folder, 1, 1)[0] == "0001.dcm"
    assert arrive(folder, 1, 1)[0] == "0001A.dcm"  # another instance numbered 1
    name, renames = arrive(folder, 1, 2)
    assert renames == [("0001.dcm", "0001_01.dcm"), ("0001A.dcm", "0001_01A.dcm")]
    assert name == "0001_02.dcm"


@pytest.mark.parametrize("name, stem, echo, parsed", [
    ("0001.dcm", "0001", 1, ("", "")),
    ("0001A2.dcm", "0001", 1, ("", "A2")),
    ("0001_01.dcm", "0001", 1, ("_01", "")),
    ("0001_02A.dcm", "0001", 2, ("_02", "A")),
    ("0001.dcm", "0001", 2, None),  # echo 2 named without its suffix: not by this template
    ("0001_02.dcm", "0001", 1, None),  # another echo's suffix
    ("0001_copy.dcm", "0001", 1, None),  # named by a hand
    ("MR.0001.dcm", "0001", 1, None),  # named by an older template
    # Templates whose file name ends in _<digits>: the stem comes from the header, so the
    # digits are never taken for an echo suffix.
    ("IMG_0001.dcm", "IMG_0001", 1, ("", "")),
    ("IMG_0001_01.dcm", "IMG_0001", 1, ("_01", "")),
    ("IMG_0001_02.dcm", "IMG_0001", 2, ("_02", "")),
    ("fmri_run_02_0001.dcm", "fmri_run_02_0001", 1, ("", "")),
    ("fmri_run_02_0001.dcm", "fmri_run_02_0001", 2, None),
    ("fmri_run_02_0001A.dcm", "fmri_run_02_0001", 1, ("", "A")),
])
def test_a_name_is_read_back_per_template(name, stem, echo, parsed):
    assert read_back(name, stem, ".dcm", echo) == parsed


def test_names_read_back_tell_which_files_may_be_renamed_and_whether_the_series_has_several_echoes():
    folder = Folder(("phantom", "002"), None)
    folder.note_name("0001.dcm", "0001", ".dcm", 1)
    folder.note_name("0002A.dcm", "0002", ".dcm", 1)
    folder.note_name("MR.3.dcm", "0003", ".dcm", 1)  # an older template's: never renamed
    assert folder.plain == {"0001.dcm", "0002A.dcm"} and not folder.multi
    assert folder.stems == {"0001.dcm": ("0001", ""), "0002A.dcm": ("0002", "A")}
    folder.note_name("0004_02.dcm", "0004", ".dcm", 2)
    assert not folder.multi  # that says a second echo came, which the echoes read say too
    folder.note_name("0005_01.dcm", "0005", ".dcm", 1)
    assert folder.multi  # renamed for a second echo that a kill may have stopped


@pytest.mark.parametrize("series, owner", [
    ([], None),
    ([None], FOREIGN),  # only files dumpwatch cannot read: never shared
    (["1.2.3", "1.2.3"], "1.2.3"),
    (["1.2.3", None], "1.2.3"),  # a file it cannot read says nothing of the series
    (["1.2.3", "1.2.4"], FOREIGN),
])
def test_a_folder_belongs_to_the_one_series_its_files_hold(series, owner):
    assert series_owner(series) == owner


@pytest.mark.parametrize("name, number", [
    ("002-gre", 1), ("002-gre_2", 2), ("002-gre_17", 17), ("002-gre_9999", 9999),
    ("002-gre_12345", None), ("002-gre_", None), ("002-gre_x", None), ("002-gre2", None), ("002", None),
])
def test_folder_numbers(name, number):
    assert folder_number(name, "002-gre") == number


def pictures(**series: str | None):
    """look() for own_folder: each folder named holds that series (None: blocked); others are free."""
    def look(name: str) -> Folder | None:
        if name in series and series[name] is None:
            return None
        return Folder(("phantom", name), series.get(name))
    return look


def test_a_series_owns_the_template_s_folder_when_it_is_free():
    assert own_folder("1.2.3", "002", 0, pictures()).rel == ("phantom", "002")


def test_a_folder_holding_another_series_is_not_this_series_so_a_free_name_is_chosen():
    assert own_folder("1.2.3", "002", 1, pictures(**{"002": "9.9"})).rel == ("phantom", "002_2")
    assert own_folder("1.2.3", "002", 2, pictures(**{"002": "9.9", "002_2": FOREIGN})).rel == ("phantom", "002_3")
    assert own_folder("1.2.3", "002", 1, pictures(**{"002": None})).rel == ("phantom", "002_2")  # blocked


def test_a_series_folder_is_found_under_any_number_up_to_the_last_on_disk():
    """A folder moved by hand into a sibling's name is still its series' own: taking the
    first free name instead would store the series twice."""
    found = pictures(**{"002": "9.9", "002_3": "1.2.3"})
    assert own_folder("1.2.3", "002", 3, found).rel == ("phantom", "002_3")
    assert own_folder("1.2.3", "002", 1, found).rel == ("phantom", "002_2")  # not on disk: not looked for
    assert own_folder("1.2.4", "002", 3, found).rel == ("phantom", "002_2")
