"""The one-line reasons an operator reads when a file could not go where it should: an OS
error in words, and which folder refused and to whom."""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

STILL_ARRIVING = "incomplete, may still be arriving"  # a reason to leave a file that is no problem yet


def os_reason(exc: OSError) -> str:
    """A one-line reason for an OS error, e.g. 'No space left on device'."""
    text = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return f"disk full ({text})"
    return text


def disk_full(reason: str) -> bool:
    """True if a file was left for want of space (os_reason's words for ENOSPC, anywhere in
    the reason): serve then pauses rather than try each file again."""
    return "disk full (" in reason


def not_placed(exc: BaseException, dest: str | None = None, root: str | None = None, source: str | None = None) -> str:
    """Why a file could not be placed at dest (in the tree at root), moved from source."""
    text = os_reason(exc) if isinstance(exc, OSError) else str(exc)
    return f"cannot place it: {text}{denied(exc, dest, root, source)}"


def not_quarantined(reason: str, source: str, exc: OSError, qdir: Path) -> str:
    """Why a file rejected for reason could not be moved into the quarantine qdir."""
    where = denied(exc, str(qdir / "x"), None, source)
    return f"cannot quarantine it ({reason}): {os_reason(exc)}{where}"


def denied(exc: BaseException, dest: str | None, root: str | None = None, source: str | None = None) -> str:
    """Where a refusal came from, as " (user U may not write in F)"; "" if not one, or not found.

    The error cannot say: the tree's folders are opened one by one, by fd, so it names one
    component at most; and a move is refused by the folder it takes the file out of (the
    dump) as often as by the one it puts it in.
    """
    if not isinstance(exc, OSError) or exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    problem = (_blocking_folder(dest, root) if dest else None) or (_source_problem(source) if source else None)
    return f" (user {_user()} {problem})" if problem else ""


def _blocking_folder(dest: str, root: str | None) -> str | None:
    """What this process may not do on the way to dest: read a folder (each one from root
    down is opened), or write in the nearest existing one."""
    folder = os.path.dirname(dest)
    while folder and not os.path.lexists(folder):  # also where a folder above may not be searched
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    if not folder:
        return None
    chain = [folder]
    if root and _inside(folder, root):
        while chain[-1] != root:
            chain.append(os.path.dirname(chain[-1]))
    for above in reversed(chain):
        if not _may(above, os.R_OK | os.X_OK):
            return f"may not read {above}"
    return None if _may(folder, os.W_OK | os.X_OK) else f"may not write in {folder}"


def _source_problem(source: str) -> str | None:
    """Why a file may not be taken out of its folder: the folder is not ours to write in, or
    is sticky (a shared dump) and the file is another user's."""
    folder = os.path.dirname(source)
    if not _may(folder, os.W_OK | os.X_OK):
        return f"may not write in {folder}"
    try:
        st, file_st = os.stat(folder), os.lstat(source)
    except OSError:
        return None
    if st.st_mode & stat.S_ISVTX and os.geteuid() not in (0, st.st_uid, file_st.st_uid):
        return f"may not move another user's file out of {folder}, a folder with the sticky bit"
    return None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _may(path: str, mode: int) -> bool:
    """os.access as this process is (its effective ids, where the system can tell)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# What kind of problem a quarantine reason names: the page groups by it, and /metrics labels
# with it (a bounded set: a reason's own text holds sizes, values and names).
KINDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (label, title, words the reason starts with or holds)
    ("not_dicom", "not a DICOM file", ("not a DICOM file",)),
    ("truncated", "truncated", ("truncated",)),
    ("unreadable", "unreadable or damaged", ("unreadable", "a file meta that cannot be read", "damaged element",
                                            "the deflated data set", "the file meta names transfer syntax")),
    ("not_a_file", "not a regular file", ("a symbolic link", "a socket", ", not a file")),
    ("dicomdir", "a DICOMDIR", ("a DICOMDIR",)),
    ("sender_not_allowed", "sender not allowed", ("sender ",)),
    ("no_sop_instance_uid", "no SOPInstanceUID", ("no SOPInstanceUID",)),
    ("burned_in_annotation", "burned-in annotation", ("BurnedInAnnotation",)),
    ("subject_not_mapped", "subject not in anon_subjects", ("subject not in the pseudonym map",)),
    ("leak_check", "anonymisation leak check", ("leak check",)),
    ("unsafe_name", "unsafe name in the tree", ("refusing the unsafe name", "unsafe folder name",
                                                "in the sorted tree is not a folder")),
    ("stopped_reader", "stopped the reading process", ("it stopped dumpwatch itself", "it stopped the reading")),
    ("internal_error", "internal error", ("internal error",)),
)
OTHER = ("other", "other")
TITLES = {label: title for label, title, _ in KINDS} | {OTHER[0]: OTHER[1]}


def kind(reason: str | None) -> str:
    """The label of a quarantine reason's kind (KINDS), 'other' if none fits."""
    text = reason or ""
    for label, _, words in KINDS:
        if any(text.startswith(w) or (w.startswith(",") and w in text) for w in words):
            return label
    return OTHER[0]
