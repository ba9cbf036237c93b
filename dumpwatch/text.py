"""Text as dumpwatch stores and prints it: file names that are not UTF-8, and times."""

from __future__ import annotations

import time


def printable(text: str) -> str:
    """Text safe to store and print: a file name that is not UTF-8 keeps its odd bytes as \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def now() -> str:
    """UTC time to the millisecond, as the journal stores it."""
    return time_text(time.time())


def time_text(moment: float) -> str:
    """A time.time() value as the journal stores times."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment * 1000) % 1000:03d}Z"
