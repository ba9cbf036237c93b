"""Tree alone on a tiny real tree in tmp_path: decide and apply as a batch of the sorter does,
for files made from a real scanner file. Echo suffixes, series folders, collisions, names
read back from disk after a restart, and the checks made before a source is removed."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from dumpwatch.dicomfile import read_prefix
from dumpwatch.identity import Placed
from dumpwatch.naming import Template, friendly_name, header_text, naming_tags
from dumpwatch.tree import Decision, Tree, TreeChanged

from helpers import make_dicom, tree_of

TEMPLATE = Template.parse("<PatientName>/<SeriesNumber:03>/<InstanceNumber:04>")
SERIES = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def new_tree(root: Path):
    """new_tree(template) makes a Tree on root, as a start of dumpwatch does (each one is
    closed after the test): a second one reads the tree afresh from disk."""
    made: list[Tree] = []

    def make(template: Template = TEMPLATE) -> Tree:
        made.append(Tree(root, "dcm", 0o2775, None, template))
        return made[-1]

    yield make
    for tree in made:
        tree.close()


@pytest.fixture
def tree(new_tree) -> Tree:
    return new_tree()


def arguments(fd: int, path: Path, template: Template = TEMPLATE) -> tuple:
    """decide()'s arguments for a received file in the folder open at fd, as the sorter
    passes them for a file it moves (not a staged copy)."""
    header = read_prefix(fd, path.name, naming_tags(template))
    assert header is not None, path
    st = header.st
    source = Placed(fd, path.name, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return (friendly_name(header.ds, template), header_text(header.ds, "SeriesInstanceUID"),
            header_text(header.ds, "SOPInstanceUID"), source, header.body_size, st.st_dev, st.st_ino)


def sort(tree: Tree, *paths: Path, template: Template = TEMPLATE) -> list[Decision]:
    """Decide where each file goes, then place each, as one batch of the sorter does (a
    duplicate's source is left where it is: the sorter removes it)."""
    fds = [os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY) for path in paths]
    try:
        decisions = [tree.decide(*arguments(fd, path, template)) for fd, path in zip(fds, paths, strict=True)]
        for decision, fd, path in zip(decisions, fds, paths, strict=True):
            tree.apply(decision, (fd, path.name))
    finally:
        for fd in fds:
            os.close(fd)
    return decisions


def echoes_file(folder: Path, template_file: Path, order, instance: int = 1, **fields) -> list[Path]:
    return [make_dicom(folder / f"MR.{instance}.{echo}", template_file, SeriesInstanceUID=SERIES,
                       InstanceNumber=instance, EchoNumbers=echo, **fields) for echo in order]


def names(root: Path) -> list[str]:
    return sorted(tree_of(root))


def echo_in(path: Path) -> int:
    return int(dcmread(path, stop_before_pixels=True).EchoNumbers)


ORDERS = [*itertools.permutations((1, 2)), *itertools.permutations((1, 2, 3))]


@pytest.mark.parametrize("batches", ["one-by-one", "one-batch", "restart-between"])
@pytest.mark.parametrize("order", ORDERS, ids=lambda order: "-".join(map(str, order)))
def test_echo_suffixes_in_any_order_of_arrival_and_re_sends_add_nothing(tmp_path, root, new_tree, template_file,
                                                                        order, batches):
    files = echoes_file(tmp_path / "in", template_file, order)
    again = [Path(shutil.copy(f, tmp_path / f"again-{f.name}")) for f in files]
    if batches == "one-batch":
        sort(new_tree(), *files)
    else:
        tree = new_tree()
        for path in files:
            sort(tree, path)
            if batches == "restart-between":
                tree = new_tree()
    expected = [f"phantom/002/0001_{echo:02d}.dcm" for echo in sorted(order)]
    assert names(root) == expected
    assert [echo_in(root / name) for name in expected] == sorted(order)
    placed = tree_of(root)
    tree = new_tree()
    for path, echo in zip(again, order, strict=True):  # each re-sent, alone
        (decision,) = sort(tree, path)
        assert (decision.outcome, decision.renames) == ("duplicate", [])
        assert decision.rel == ("phantom", "002", f"0001_{echo:02d}.dcm")
    assert tree_of(root) == placed


def test_a_single_echo_series_keeps_plain_names(tmp_path, tree, root, template_file):
    sort(tree, *echoes_file(tmp_path / "in", template_file, [1]))
    sort(tree, make_dicom(tmp_path / "in" / "MR.2", template_file, SeriesInstanceUID=SERIES, InstanceNumber=2,
                          EchoNumbers=None))
    assert names(root) == ["phantom/002/0001.dcm", "phantom/002/0002.dcm"]


@pytest.mark.parametrize("restart", [False, True], ids=["same-tree", "after-restart"])
def test_a_second_echo_renames_the_first_echo_s_files_on_disk(tmp_path, root, new_tree, template_file, restart):
    tree = new_tree()
    sort(tree, *echoes_file(tmp_path / "a", template_file, [1]), *echoes_file(tmp_path / "b", template_file, [1], 2))
    (decision,) = sort(new_tree() if restart else tree, *echoes_file(tmp_path / "c", template_file, [2]))
    assert decision.renames == []  # apply drops each rename it made
    assert names(root) == ["phantom/002/0001_01.dcm", "phantom/002/0001_02.dcm", "phantom/002/0002_01.dcm"]


def test_a_folder_holding_another_series_is_not_this_series(tmp_path, root, new_tree, template_file):
    tree = new_tree()
    for n in (1, 2, 3):
        sort(tree, make_dicom(tmp_path / "in" / f"MR.{n}", template_file, SeriesInstanceUID=SERIES + str(n)))
    assert names(root) == ["phantom/002/0001.dcm", "phantom/002_2/0001.dcm", "phantom/002_3/0001.dcm"]
    (root / "phantom" / "002_3").rename(root / "phantom" / "002_7")  # by hand
    late = [make_dicom(tmp_path / "late" / f"MR.{n}", template_file, SeriesInstanceUID=SERIES + str(n),
                       InstanceNumber=2) for n in (1, 2, 3, 4)]
    assert [d.rel for d in sort(new_tree(), *late)] == [  # read from disk
        ("phantom", "002", "0002.dcm"), ("phantom", "002_2", "0002.dcm"), ("phantom", "002_7", "0002.dcm"),
        ("phantom", "002_3", "0002.dcm")]


def test_a_folder_of_files_dumpwatch_cannot_read_is_nobody_s(tmp_path, tree, root, template_file):
    (root / "phantom" / "002").mkdir(parents=True)
    (root / "phantom" / "002" / "junk.dcm").write_bytes(b"not DICOM" * 100)
    (root / "phantom" / "003").mkdir(parents=True)
    (root / "phantom" / "003" / "notes.txt").write_text("a hand's notes: not a series' file")
    (decision,) = sort(tree, make_dicom(tmp_path / "in" / "a", template_file))
    assert decision.rel == ("phantom", "002_2", "0001.dcm")
    (decision,) = sort(tree, make_dicom(tmp_path / "in" / "b", template_file, SeriesNumber=3))
    assert decision.rel == ("phantom", "003", "0001.dcm")


def test_different_content_at_a_taken_name_gets_the_next_free_name(tmp_path, root, new_tree, template_file):
    first = make_dicom(tmp_path / "in" / "first", template_file, SeriesInstanceUID=SERIES)
    same_uid = make_dicom(tmp_path / "in" / "changed", template_file, SeriesInstanceUID=SERIES,
                          SOPInstanceUID=dcmread(first).SOPInstanceUID, ImageComments="changed")
    other = make_dicom(tmp_path / "in" / "other", template_file, SeriesInstanceUID=SERIES)
    assert [d.name for d in sort(new_tree(), first, same_uid, other)] == ["0001.dcm", "0001A.dcm", "0001A2.dcm"]
    folder = root / "phantom" / "002"
    (folder / "0002.dcm").mkdir()  # something else at a name a file needs: a folder, a symlink, a FIFO
    os.symlink("/etc/hostname", folder / "0002A.dcm")
    os.mkfifo(folder / "0002A2.dcm")
    # (A new Tree: a hand's change within the same clock tick as dumpwatch's last one leaves
    # the folder's mtime as it was, and this test must not depend on the tick.)
    (decision,) = sort(new_tree(), make_dicom(tmp_path / "in" / "two", template_file, SeriesInstanceUID=SERIES,
                                              InstanceNumber=2))
    assert decision.name == "0002A3.dcm"


@pytest.mark.parametrize("restart", [False, True], ids=["same-tree", "after-restart"])
def test_a_renamed_echo_keeps_its_collision_suffix(tmp_path, root, new_tree, template_file, restart):
    tree = new_tree()
    sort(tree, *echoes_file(tmp_path / "a", template_file, [1]), *echoes_file(tmp_path / "b", template_file, [1]))
    sort(new_tree() if restart else tree, *echoes_file(tmp_path / "c", template_file, [2]))
    assert names(root) == ["phantom/002/0001_01.dcm", "phantom/002/0001_01A.dcm", "phantom/002/0001_02.dcm"]


@pytest.mark.parametrize("text", ["IMG_<InstanceNumber:04>", "<SeriesDescription>_<InstanceNumber:04>"])
def test_names_ending_in_underscore_digits_are_read_back_as_the_template_names_them(tmp_path, root, new_tree,
                                                                                   template_file, text):
    """'IMG_0001' and 'fmri_run_02_0001' are echo-1 files of a single-echo series, not echo 1
    of 'IMG' or echo 2 of 'fmri_run': read back from disk, they are the template's plain
    names, and a second echo renames them."""
    template = Template.parse(f"<PatientName>/<SeriesNumber:03>/{text}")
    stem = "IMG" if text.startswith("IMG") else "fmri_run_02"
    sort(new_tree(template), *[make_dicom(tmp_path / "in" / f"MR.{n}", template_file, SeriesInstanceUID=SERIES,
                                          SeriesDescription="fmri_run_02", InstanceNumber=n) for n in (1, 2)],
         template=template)
    fresh = new_tree(template)
    folder = fresh.cache.folder(("phantom", "002"))
    assert (folder.series_uid, folder.multi) == (SERIES, False)
    assert folder.plain == {f"{stem}_0001.dcm", f"{stem}_0002.dcm"}
    sort(fresh, *echoes_file(tmp_path / "two", template_file, [2], SeriesDescription="fmri_run_02"), template=template)
    assert names(root) == [f"phantom/002/{stem}_0001_01.dcm", f"phantom/002/{stem}_0001_02.dcm",
                           f"phantom/002/{stem}_0002_01.dcm"]


def test_still_holds_only_the_twin_that_was_matched(tmp_path, tree, template_file):
    original = make_dicom(tmp_path / "in" / "MR.1", template_file, SeriesInstanceUID=SERIES)
    copies = [Path(shutil.copy(original, tmp_path / "in" / f"copy{n}")) for n in (1, 2, 3)]
    fd = os.open(original.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # In one batch, a re-send's twin is only planned until it is placed.
        first, resend = (tree.decide(*arguments(fd, path)) for path in (original, copies[0]))
        dest = str(tree.path(resend.rel))
        assert (resend.outcome, resend.rel) == ("duplicate", first.rel)
        assert not Tree.still_holds(resend, dest)
        tree.apply(first, (fd, original.name))
    finally:
        os.close(fd)
    assert Tree.still_holds(resend, dest)
    (later,) = sort(tree, copies[1])
    assert later.outcome == "duplicate" and Tree.still_holds(later, dest)
    os.rename(dest, dest + ".moved")  # removed by hand
    assert not Tree.still_holds(later, dest)
    shutil.copy(copies[2], dest)  # the same bytes, but not the file that was matched
    assert not Tree.still_holds(later, dest)


@pytest.mark.parametrize("hand, message", [
    ("replaced", "changed while this file was being sorted"),
    ("removed", "was moved or removed while this file was being sorted"),
])
def test_a_folder_changed_by_hand_between_deciding_and_placing_is_not_written(tmp_path, tree, root, template_file,
                                                                              hand, message):
    sort(tree, make_dicom(tmp_path / "in" / "MR.1", template_file, SeriesInstanceUID=SERIES))
    path = make_dicom(tmp_path / "in" / "MR.2", template_file, SeriesInstanceUID=SERIES, InstanceNumber=2)
    folder = root / "phantom" / "002"
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        decision = tree.decide(*arguments(fd, path))
        folder.rename(root / "phantom" / "aside")
        if hand == "replaced":
            folder.mkdir()
        with pytest.raises(TreeChanged, match=message):
            tree.apply(decision, (fd, path.name))
    finally:
        os.close(fd)
    assert path.exists()
    tree.forget(decision.folder)
    assert [d.rel for d in sort(tree, path)] == [("phantom", "002", "0002.dcm")]
