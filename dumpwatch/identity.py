"""Data-set identity: do two files hold the same instance? A re-send rewrites only the file meta."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from dumpwatch.dicomfile import PREFIX, open_tree_file
from dumpwatch.elements import meta_end


def data_set_identity(buffer, size: int) -> tuple[str, int]:
    """What makes two files the same instance: the bytes of the data set, in its transfer
    syntax. A PACS that re-sends an image rewrites only its file meta (group 0002: the
    sender's AE title, its implementation version, the group's length), so the file meta
    is left out. Returns (hex digest, bytes of data set); a file whose meta cannot be read
    is identified by all of its bytes."""
    found = meta_end(buffer, size)
    start, syntax = found if found else (0, "")
    digest = hashlib.sha256(syntax.encode("ascii", "replace") + b"\0")
    view = memoryview(buffer)
    for offset in range(start, size, 1 << 24):
        digest.update(view[offset : min(size, offset + (1 << 24))])
    view.release()
    return digest.hexdigest(), size - start


def identity_at(dir_fd: int, name: str, expect: tuple[int, int, int, int] | None = None) -> tuple[str, int] | None:
    """data_set_identity() of a file in a folder (never through a symlink); None if it is
    not a regular file or cannot be read, or (with expect) if its (st_dev, st_ino, st_size,
    st_mtime_ns) are not those. Read, not mapped: a file in the tree that a hand truncates
    meanwhile must give an error here, not a SIGBUS that ends the process."""
    opened = open_tree_file(dir_fd, name)
    if opened is None:
        return None
    fd, st = opened
    try:
        if expect is not None and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != expect:
            return None
        head = os.pread(fd, PREFIX, 0)
        found = meta_end(head, len(head))
        start, syntax = found if found else (0, "")
        digest = hashlib.sha256(syntax.encode("ascii", "replace") + b"\0")
        offset = start
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest(), offset - start
    except OSError:
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Placed:
    """Where the bytes of one file can be read to compare its data set with another's: a
    name in a folder, proven by (st_dev, st_ino, st_size, st_mtime_ns) when `expect` is
    given; or, for bytes that exist only in memory (a dry run that rewrites a header), only
    their data_set_identity()."""

    dir_fd: int
    name: str
    expect: tuple[int, int, int, int] | None = None
    identity: str | None = None


def same_data_set(a: Placed, b: Placed) -> bool | None:
    """Do a and b hold the same data set in the same transfer syntax (a re-send: the file
    meta may differ)? None if either cannot be read, or is not the file `expect` names.

    Compared byte by byte, not by digests: reading both from the page cache and comparing
    them costs a fraction of hashing either, and proves more."""
    if a.identity is not None or b.identity is not None:
        known, other = (a, b) if a.identity is not None else (b, a)
        if other.identity is not None:
            return known.identity == other.identity
        found = identity_at(other.dir_fd, other.name, other.expect)
        return None if found is None else found[0] == known.identity
    fds = []
    try:
        for side in (a, b):
            opened = open_tree_file(side.dir_fd, side.name)
            if opened is None:
                return None
            fds.append(opened[0])
            st = opened[1]
            if side.expect is not None and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != side.expect:
                return None
        heads = [os.pread(fd, PREFIX, 0) for fd in fds]
        metas = [meta_end(head, len(head)) or (0, "") for head in heads]
        if metas[0][1] != metas[1][1]:
            return False
        offsets = [meta[0] for meta in metas]
        while True:
            # 64 KiB at a time: a chunk of 1 MiB is mapped afresh for each read and took
            # three times as long.
            chunks = [os.pread(fd, 1 << 16, offset) for fd, offset in zip(fds, offsets, strict=True)]
            if chunks[0] != chunks[1]:
                return False
            if not chunks[0]:
                return True
            offsets = [offset + len(chunks[0]) for offset in offsets]
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)
