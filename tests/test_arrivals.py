"""Arrivals alone, on real files in tmp_path: when a file counts as finished, and how many
files it holds in hand."""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import time
from pathlib import Path

import pytest

from dumpwatch.arrivals import Arrivals, Changed, Closed, SweepNow, open_elsewhere
from dumpwatch.dumplock import LOCK_NAME

STABLE = 2.0  # seconds a noted file must stand still


def arrivals(dump: Path, *, polling: bool = False, in_hand: int = 100) -> Arrivals:
    return Arrivals(dump, queue.SimpleQueue(), polling=polling, stable_seconds=STABLE, in_hand=in_hand)


def files(dump: Path, count: int, age: float = 0.0) -> list[str]:
    """count files in dump, last written age seconds ago."""
    paths = []
    for number in range(count):
        path = dump / f"file{number:03}"
        path.write_bytes(b"x" * 10)
        if age:
            then = time.time() - age
            os.utime(path, (then, then))
        paths.append(str(path))
    return paths


def test_a_closed_file_is_handed_over_once(tmp_path):
    [path] = files(tmp_path, 1)
    watch = arrivals(tmp_path)
    watch.finish(path)
    watch.finish(path)  # a sweep and an event both found it
    assert watch.take_finished() == [path]
    assert watch.take_finished() == []
    watch.finish(path)  # still in hand: not again
    assert watch.take_finished() == []
    watch.done(path)
    watch.finish(path)  # left in the dump, and due again
    assert watch.take_finished() == [path]


def test_only_files_directly_in_the_dump_count(tmp_path):
    (tmp_path / "sub").mkdir()
    watch = arrivals(tmp_path)
    watch.finish(str(tmp_path / LOCK_NAME))
    watch.finish(str(tmp_path / "sub" / "file"))
    watch.finish(str(tmp_path.parent / "file"))
    assert watch.take_finished() == [] and watch.count() == 0


def test_a_swept_file_is_finished_once_it_has_stood_still(tmp_path):
    old, new = files(tmp_path, 2)
    then = time.time() - 2 * STABLE
    os.utime(old, (then, then))
    (tmp_path / "folder").mkdir()
    (tmp_path / LOCK_NAME).write_text("{}")
    watch = arrivals(tmp_path)
    watch.sweep(waiting=set())
    assert sorted(watch.changed) == [old, new]  # no folder, no lock
    moment = time.monotonic()
    watch.settle(moment)
    assert watch.take_finished() == [old]  # still long enough by its mtime
    assert watch.next_settle(moment) == pytest.approx(moment + STABLE, abs=0.5)
    watch.settle(moment + STABLE + 0.1)
    assert watch.take_finished() == [new]
    assert watch.next_settle(moment) is None


def test_a_sweep_skips_files_in_hand_and_files_waiting_to_be_tried_again(tmp_path):
    held, waiting, free = files(tmp_path, 3)
    watch = arrivals(tmp_path)
    watch.finish(held)
    watch.sweep(waiting={waiting})
    assert list(watch.changed) == [free]


def sorted_away(watch: Arrivals, paths: list[str]) -> None:
    """As the loop does once the workers placed them: gone from the dump, and done."""
    for path in paths:
        os.unlink(path)
        watch.done(path)


def test_a_sweep_takes_no_more_than_there_is_room_for(tmp_path):
    files(tmp_path, 10, age=60)
    watch = arrivals(tmp_path, in_hand=4)
    watch.sweep(waiting=set())
    assert len(watch.changed) == 4 and watch.backlog
    watch.settle(time.monotonic())
    taken = watch.take_finished()
    assert len(taken) == 4 and watch.count() == 4
    sorted_away(watch, taken[:2])
    assert not watch.want_more()  # 2 in hand: not below half
    sorted_away(watch, taken[2:3])
    assert watch.want_more()
    watch.sweep(waiting=set())  # room for 3 more, none of them the one in hand
    assert len(watch.changed) == 3 and taken[3] not in watch.changed
    assert watch.backlog  # 3 files still wait
    watch.settle(time.monotonic())
    sorted_away(watch, [taken[3], *watch.take_finished()])
    assert watch.count() == 0
    watch.sweep(waiting=set())  # the last 3: room for all
    assert len(watch.changed) == 3 and not watch.backlog


def test_an_arrival_without_room_waits_in_the_dump_and_is_said_once(tmp_path, caplog):
    paths = files(tmp_path, 6)
    watch = arrivals(tmp_path, in_hand=4)
    with caplog.at_level(logging.INFO, logger="dumpwatch.arrivals"):
        for path in paths:
            watch.finish(path)
    assert watch.take_finished() == paths[:4]
    assert watch.backlog
    said = [r.getMessage() for r in caplog.records if "newer files wait" in r.getMessage()]
    assert said == ["4 files in hand (in_hand 4): newer files wait in the dump until there is room"]
    # With a backlog, a new arrival finds room only below half: the sweep for the waiting
    # files comes before newer files take their place.
    for path in paths[:3]:
        watch.done(path)
    watch.finish(paths[4])
    assert watch.take_finished() == [paths[4]]  # 1 in hand, below 2
    watch.finish(paths[5])
    assert watch.take_finished() == []  # 2 in hand: not below half


def test_polling_finishes_a_file_only_once_it_stands_still_here(tmp_path):
    [path] = files(tmp_path, 1, age=3600)  # an old mtime counts for nothing: the server's clock may differ
    watch = arrivals(tmp_path, polling=True)
    watch.sweep(waiting=set())
    moment = time.monotonic()
    watch.settle(moment)
    assert watch.take_finished() == []
    with open(path, "ab") as writer:  # written again meanwhile: waits again
        writer.write(b"more")
    watch.note(path, moment + 1)
    watch.settle(moment + STABLE + 0.5)
    assert watch.take_finished() == []
    watch.settle(moment + 1 + STABLE)
    assert watch.take_finished() == [path]


def test_polling_sees_a_change_the_event_missed(tmp_path):
    [path] = files(tmp_path, 1)
    watch = arrivals(tmp_path, polling=True)
    moment = time.monotonic()
    watch.note(path, moment)
    with open(path, "ab") as writer:  # its size changes after it was noted
        writer.write(b"more")
    watch.settle(moment + STABLE)
    assert watch.take_finished() == []  # noted anew, at this moment
    watch.settle(moment + 2 * STABLE)
    assert watch.take_finished() == [path]


def test_a_noted_file_that_goes_away_is_forgotten(tmp_path):
    [path] = files(tmp_path, 1)
    watch = arrivals(tmp_path, polling=True)
    watch.note(path, time.monotonic())
    os.unlink(path)
    watch.settle(time.monotonic() + STABLE)
    assert watch.take_finished() == [] and watch.count() == 0


def test_a_file_open_in_another_process_is_not_finished(tmp_path):
    [path] = files(tmp_path, 1, age=60)
    with open(path, "rb") as held:
        writer = subprocess.Popen(["sleep", "30"], stdin=held)  # a writer that stalled
    try:
        assert open_elsewhere([path]) == {path}
        watch = arrivals(tmp_path)
        watch.sweep(waiting=set())
        moment = time.monotonic()
        watch.settle(moment)
        assert watch.take_finished() == []  # looked at again later
        assert watch.changed[path][0] == moment
    finally:
        writer.kill()
        writer.wait()
    watch.settle(moment + STABLE)
    assert watch.take_finished() == [path]


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_watching_hands_the_dump_s_events_over(tmp_path, polling):
    watch = arrivals(tmp_path, polling=polling)
    watch.start()
    try:
        watch.check()
        (tmp_path / "new").write_bytes(b"x")
        item = watch.todo.get(timeout=10)
        assert item == (Changed if polling else Closed)(str(tmp_path / "new"))
        logging.getLogger("watchdog.observers.inotify_buffer").warning("inotify event queue overflowed")
        while not isinstance(item, SweepNow):
            item = watch.todo.get(timeout=10)
        assert item == SweepNow("inotify queue overflow")
    finally:
        watch.stop()


def test_a_dump_removed_under_the_watch_stops_serve(tmp_path):
    from dumpwatch.errors import ServeFailed

    dump = tmp_path / "dump"
    dump.mkdir()
    watch = arrivals(dump)
    watch.start()
    try:
        os.rename(dump, tmp_path / "moved")  # inotify goes on watching the folder, not its name
        dump.mkdir()
        with pytest.raises(ServeFailed, match="was removed or replaced"):
            watch.check()
    finally:
        watch.stop()
