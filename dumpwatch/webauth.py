"""The web page's logins: a file of users and scrypt-hashed passwords (web_passwords), written
by `dumpwatch web-password`, checked against HTTP basic auth.

A line is `user:scrypt$N$r$p$salt$hash` (salt and hash in base64). scrypt is in Python's
standard library and costs memory as well as time, so a stolen file is slow to guess from.
Each check costs tens of milliseconds: a check that succeeded is remembered for a few minutes
(by a keyed digest of the header, never the password), checks run one at a time, and a wrong
password waits a second before its answer, so guessing over the network is slow too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

N, R, P = 2**14, 8, 1  # scrypt's cost: 16 MiB and ~50 ms a check on a small server
_USER = re.compile(r"[A-Za-z0-9._@-]{1,64}")
REMEMBER = 300  # seconds a header that passed is taken without scrypt again
WRONG_WAIT = 1.0  # seconds a wrong login waits for its answer


class PasswordFileError(Exception):
    """The password file cannot be used (absent, unreadable, a line not understood, no user)."""


def check_user(name: str) -> str:
    if not _USER.fullmatch(name):
        raise ValueError(f"a user name is 1 to 64 letters, digits, '.', '_', '@' or '-': {name!r}")
    return name


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, maxmem=64 << 20, dklen=32)
    return f"scrypt${N}${R}${P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify(password: str, hashed: str) -> bool:
    try:
        kind, n, r, p, salt, digest = hashed.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r),
                             p=int(p), maxmem=256 << 20, dklen=len(expected))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, expected)


def read_passwords(path: Path) -> dict[str, str]:
    """{user: hash}; PasswordFileError if the file is absent, unreadable, or holds no user."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PasswordFileError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    users = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, hashed = line.partition(":")
        if not _USER.fullmatch(name) or not hashed.startswith("scrypt$") or hashed.count("$") != 5:
            raise PasswordFileError(f"{path}, line {number}: not 'user:scrypt$...' (write it with dumpwatch "
                                    "web-password)")
        users[name] = hashed
    if not users:
        raise PasswordFileError(f"{path} holds no user (add one with dumpwatch web-password USER)")
    return users


def set_password(path: Path, user: str, password: str | None) -> bool:
    """Add or replace user's line (password None: remove it), by writing the file anew and
    renaming it into place. True if the user was there before."""
    check_user(user)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines if line.partition(":")[0].strip() != user]
    existed = len(kept) != len(lines)
    try:
        old: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        old = None
    if password is not None:
        kept.append(f"{user}:{hash_password(password)}")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if old is not None:  # as it was: its group is the web program's (chgrp, as the README says)
            try:
                os.fchown(handle, old.st_uid if os.geteuid() == 0 else -1, old.st_gid)
            except PermissionError:  # not root, and not in that group: the file gets the user's own
                pass
            os.fchmod(handle, stat.S_IMODE(old.st_mode) & 0o640)
        else:
            os.fchmod(handle, 0o640)  # the web program's group may read it; nobody else
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in kept))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return existed


@dataclass
class Checked:
    user: str | None  # who logged in, None if not
    why: str = ""  # why not, for the log


class Logins:
    """Checks Authorization headers against the password file, re-read when it changes."""

    def __init__(self, path: Path):
        self.path = path
        self.secret = secrets.token_bytes(32)
        self.lock = threading.Lock()
        self.users: dict[str, str] = {}
        self.stamp: tuple[int, int, int] | None = None
        self.passed: dict[bytes, tuple[str, float]] = {}  # keyed digest of a header -> (user, until)
        self.dummy = hash_password(secrets.token_hex(8))
        self.reload()

    def reload(self) -> None:
        """Read the file if it changed (PasswordFileError if it is no good: the caller stops)."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise PasswordFileError(f"{self.path}: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self.stamp:
            self.users, self.stamp = read_passwords(self.path), stamp
            self.passed.clear()

    def check(self, header: str | None) -> Checked:
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "basic" or not token:
            return Checked(None, "no login given")
        key = hmac.digest(self.secret, token.encode(errors="surrogateescape"), "sha256")
        with self.lock:
            try:
                self.reload()
            except PasswordFileError as exc:  # removed or broken while running: nobody gets in
                return Checked(None, str(exc))
            known = self.passed.get(key)
            if known and known[1] > time.monotonic():
                return Checked(known[0])
            try:
                user, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
            except (binascii.Error, ValueError):
                return Checked(None, "a login that is not base64 user:password")
            hashed = self.users.get(user)
            ok = verify(password, hashed or self.dummy) and hashed is not None  # as slow for unknown users
            if not ok:
                shown = repr(user[:64]) + ("..." if len(user) > 64 else "")
                return Checked(None, f"wrong password for user {shown}" if hashed else f"unknown user {shown}")
            if len(self.passed) > 1000:
                self.passed.clear()
            self.passed[key] = (user, time.monotonic() + REMEMBER)
            return Checked(user)
