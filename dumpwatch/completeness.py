"""Is a series whole? Instance numbers as ranges, their gaps, and the verdict against the
count the header expects. Data in, data out: no journal, no files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

Range = tuple[int, int]  # first and last, inclusive

WHOLE = "whole"
INCOMPLETE = "incomplete"
NO_EXPECTATION = "no expectation"
GAPS_SHOWN = 50  # ranges listed at most; the count says the rest


def shown(ranges: Iterable[Range]) -> str:
    """As a person reads them: 7, 12-14."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def add(ranges: list[Range], number: int) -> tuple[list[Range], bool]:
    """The ranges with number in them (changed in place), and whether it was there already."""
    low, high = 0, len(ranges)
    while low < high:  # the first range that ends at number - 1 or later
        middle = (low + high) // 2
        if ranges[middle][1] < number - 1:
            low = middle + 1
        else:
            high = middle
    if low < len(ranges) and ranges[low][0] <= number <= ranges[low][1]:
        return ranges, True
    result = ranges
    if low < len(result) and result[low][1] == number - 1:
        result[low] = (result[low][0], number)
        if low + 1 < len(result) and result[low + 1][0] == number + 1:
            result[low] = (result[low][0], result[low + 1][1])
            del result[low + 1]
    elif low < len(result) and result[low][0] == number + 1:
        result[low] = (number, result[low][1])
    else:
        result.insert(low, (number, number))
    return result, False


def count(ranges: Iterable[Range]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def gaps(ranges: list[Range], first: int | None = None, last: int | None = None) -> list[Range]:
    """The numbers missing between first and last (default: the lowest and highest present)."""
    if not ranges:
        return [] if first is None or last is None or last < first else [(first, last)]
    first = ranges[0][0] if first is None else first
    last = ranges[-1][1] if last is None else last
    missing: list[Range] = []
    expect = first
    for a, b in ranges:
        if b < expect:
            continue
        if a > last:
            break
        if a > expect:
            missing.append((expect, min(a - 1, last)))
        expect = b + 1
    if expect <= last:
        missing.append((expect, last))
    return missing


def merge(groups: Iterable[list[Range]]) -> tuple[list[Range], bool]:
    """The union of several groups' ranges, and whether any number is in more than one."""
    points = sorted(r for group in groups for r in group)
    union: list[Range] = []
    overlap = False
    for a, b in points:
        if union and a <= union[-1][1]:
            overlap = True
            union[-1] = (union[-1][0], max(union[-1][1], b))
        elif union and a == union[-1][1] + 1:
            union[-1] = (union[-1][0], b)
        else:
            union.append((a, b))
    return union, overlap


@dataclass
class Group:
    """The numbers of one echo (0: the series has no echo numbers) as the journal keeps them."""

    echo: int
    ranges: list[Range]
    repeats: list[Range] = field(default_factory=list)
    unnumbered: int = 0


@dataclass
class Frames:
    """A series' enhanced multi-frame files: frame sets checked, positions they lack, which."""

    sets: int = 0
    missing: int = 0
    note: str = ""


@dataclass
class Verdict:
    verdict: str  # WHOLE, INCOMPLETE or NO_EXPECTATION
    per_echo: bool  # gaps counted per echo (each echo numbers its images from 1) or over the series
    missing: dict[int, list[Range]]  # per echo (0: the whole series): numbers known missing
    missing_count: int  # also those the expected count says are missing without naming them
    repeats: dict[int, list[Range]]
    numbers: dict[int, list[Range]]
    frames: Frames = field(default_factory=Frames)

    def summary(self) -> str:
        if self.verdict == WHOLE:
            return WHOLE
        if self.verdict == NO_EXPECTATION:
            return "no expectation: no gaps"
        named = []
        for echo, missing in sorted(self.missing.items()):
            if missing:
                where = f"echo {echo}: " if self.per_echo and echo else ""
                listed = shown(missing[:GAPS_SHOWN]) + (", ..." if len(missing) > GAPS_SHOWN else "")
                named.append(where + listed)
        parts = []
        images = self.missing_count - self.frames.missing
        if images > 0 or not self.frames.missing:
            parts.append(f"missing {images}" + (f" ({'; '.join(named)})" if named else ""))
        if self.frames.missing:
            note = f" ({self.frames.note})" if self.frames.note else ""
            parts.append(f"missing {self.frames.missing} frames{note}")
        return ", ".join(parts)


def judge(groups: list[Group], expected: int | None, per_echo_expected: bool, frames: Frames | None = None) -> Verdict:
    """Gaps per echo when the echoes number their images each from 1 (the numbers overlap,
    as Siemens does); else over the whole series (GE and Philips number on across echoes).
    With an expected count, the numbers 1..expected must all be there (per echo when the
    count is per echo); without, only gaps between the lowest and highest number tell.
    Enhanced multi-frame files whose frame sets were checked are whole when no frame set
    lacks a position and no instance number is missing between the first and the last."""
    frames = frames or Frames()
    numbers = {g.echo: g.ranges for g in groups}
    repeats = {g.echo: g.repeats for g in groups if g.repeats}
    union, overlap = merge(numbers.values())
    per_echo = overlap or (per_echo_expected and len(groups) > 1)
    checked = numbers if per_echo else {0: union}
    missing: dict[int, list[Range]] = {}
    missing_count = 0
    want: int | None = None
    if expected is not None and per_echo_expected:
        want = expected if per_echo else expected * max(1, len(groups))
    elif expected is not None and not per_echo:
        want = expected  # a count of the series' images, over all its echoes
    unnumbered = {g.echo: g.unnumbered for g in groups}
    for echo, ranges in checked.items():
        loose = unnumbered.get(echo, 0) if per_echo else sum(unnumbered.values())
        have = count(ranges) + loose  # files without an InstanceNumber count, but fill no gap by name
        if want is not None and not loose and (not ranges or (ranges[0][0] >= 1 and ranges[-1][1] <= want)):
            found = gaps(ranges, 1, want)  # numbered from 1: the missing ones have names
        else:
            found = gaps(ranges)
        missing_count += max(count(found), (want or 0) - have)
        missing[echo] = found
    if expected is not None and not per_echo_expected and per_echo:
        # A count of the whole series, its echoes numbered each from 1: the total tells.
        missing_count = max(missing_count, expected - sum(count(r) for r in numbers.values()))
    missing_count += frames.missing
    if missing_count:
        verdict = INCOMPLETE
    elif expected is None and not frames.sets:
        verdict = NO_EXPECTATION
    else:
        verdict = WHOLE
    return Verdict(verdict, per_echo, {e: m for e, m in missing.items() if m}, missing_count, repeats, numbers,
                   frames)
