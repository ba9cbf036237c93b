"""The site's anonymisation secret and subject pseudonyms: the same input, the same output, always."""

from __future__ import annotations

import base64
import csv
import errno
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from dumpwatch.errors import ConfigError

KEY_BYTES = 32


def load_key(path: Path, dir_fd: int | None = None) -> bytes:
    """The secret in path, made (owner-only, 0600) on first use. Never logged.

    dir_fd: the state folder holding it (state.StateFolder): the key is then reached through
    it and never through a symlink (one planted there could name a key its planter knows).
    """
    name, nofollow = (path, 0) if dir_fd is None else (path.name, os.O_NOFOLLOW)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot make the anonymisation key: {exc.strerror}", path) from None
    else:
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        # Its mode and its text from one open file: the name cannot change in between.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | nofollow, dir_fd=dir_fd)
        with open(fd, "rb") as file:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                raise ConfigError(f"the anonymisation key is readable by others (mode {st.st_mode & 0o777:04o}); "
                                  "chmod 600 it", path)
            text = file.read().decode("ascii", "replace").strip()
    except OSError as exc:
        if exc.errno == errno.ELOOP and dir_fd is not None:
            raise ConfigError(f"{path} is a symlink, not dumpwatch's anonymisation key; remove it") from None
        raise ConfigError(f"cannot read the anonymisation key: {exc.strerror}", path) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("the anonymisation key is not hexadecimal text", path) from None
    if len(key) < 16:
        raise ConfigError("the anonymisation key is shorter than 16 bytes", path)
    return key


def load_subjects(path: Path) -> dict[str, str]:
    """A CSV of original PatientID or PatientName -> subject code; '#' starts a comment."""
    subjects: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as file:
            for number, row in enumerate(csv.reader(file), start=1):
                if not row or row[0].lstrip().startswith("#") or not "".join(row).strip():
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise ConfigError("expected two columns: original PatientID or PatientName, subject code",
                                      path, number)
                original, code = row[0].strip(), row[1].strip()
                if number == 1 and original.lower() in ("original", "patientid", "patient", "patientname"):
                    continue  # a header row
                if original in subjects and subjects[original] != code:
                    raise ConfigError("two codes for one subject", path, number)
                subjects[original] = code
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path) from None
    return subjects


def digest(key: bytes, purpose: str, text: str) -> bytes:
    return hmac.new(key, f"{purpose}\0{text}".encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def new_uid(key: bytes, uid: str) -> str:
    """2.25.<128-bit integer> from the secret and the UID: consistent, and irreversible without the key."""
    return "2.25." + str(int.from_bytes(digest(key, "uid", uid)[:16], "big"))


def subject_code(key: bytes, subject: str) -> str:
    return "SUBJ" + base64.b32encode(digest(key, "subject", subject)[:10]).decode()[:10]


def day_shift(key: bytes, subject: str) -> int:
    """Whole days (1 to 3650) to move a subject's dates back: one offset per subject."""
    return 1 + int.from_bytes(digest(key, "days", subject)[:8], "big") % 3650



def name_token(key: bytes, name: str) -> str:
    """What the journal and the log say instead of a received file's name when anonymising:
    storescp names files by their SOPInstanceUID, and old dumps by patients' names."""
    return "ANON-" + digest(key, "name", name)[:10].hex()


def path_token(key: bytes, path: str) -> str:
    return "ANON-" + digest(key, "path", path)[:10].hex()
