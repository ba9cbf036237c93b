"""The worker side of the chain: read, check, anonymise and name one file, and stage a copy
when it cannot simply be moved (prepare). Runs in worker processes; places nothing."""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmwrite

from dumpwatch import failpoints, keys, linux
from dumpwatch.anonymise import Anonymiser, empty_fields, leak
from dumpwatch.dicomfile import DicomFile, NotRegular, read_dicom
from dumpwatch.elements import meta_end
from dumpwatch.errors import Incomplete, Rejected
from dumpwatch.facts import facts_of, sender_of
from dumpwatch.fsops import copy_range, set_owner_mode, write_all, write_new
from dumpwatch.naming import Template, friendly_name, header_text
from dumpwatch.outcomes import Failed, Outcome, Prepared
from dumpwatch.reasons import STILL_ARRIVING, os_reason
from dumpwatch.retry import retry_transient
from dumpwatch.text import printable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What a worker needs to prepare files; sent once to each worker process."""

    template: Template
    wanted: frozenset[int] | None  # header tags to read; None: all (to anonymise)
    reserved: frozenset[str]
    anon_fields: tuple[int, ...]  # DcmServer's list, when no profile is set
    anonymiser: Anonymiser | None
    file_mode: int
    gid: int | None
    staging: str | None  # folder on dir_out's filesystem for files dumpwatch writes itself
    out_device: int
    copy: bool
    dry_run: bool
    incomplete_timeout: float
    staging_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the staging folder the sorter proved
    senders: frozenset[str] | None = None  # allowed_senders: the calling AE titles whose files are sorted

    def shown(self, path: str | None) -> str | None:
        """A received file's path as the log shows it: when anonymising, a keyed token (its
        name holds its original SOPInstanceUID, or a patient's name)."""
        if path is None or self.anonymiser is None:
            return path
        return keys.path_token(self.anonymiser.key, path)


def _writeback_seconds() -> float:
    """How old dirty data can get before the kernel's flusher writes it (default 30 + 5 s)."""
    total = 0.0
    for name, default in (("dirty_expire_centisecs", 3000), ("dirty_writeback_centisecs", 500)):
        try:
            total += int(Path("/proc/sys/vm", name).read_text()) / 100
        except (OSError, ValueError):
            total += default / 100
    return total + 5  # and a margin for the write itself


WRITEBACK_SECONDS = _writeback_seconds()

_staging_fds: dict[tuple[str, tuple[int, int] | None], int] = {}
_STAGING_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}  # the staging folder's
_counter = itertools.count()


def staged_name() -> str:
    """A new name in the staging folder: its writer's pid first, so that a dead writer's
    copies can be told and removed (recovery.clean_staging)."""
    return f"{os.getpid()}-{next(_counter)}.part"


def prepare(path: str, job: Job) -> Prepared | Failed:
    """Read, check, anonymise and name one file; stage a copy when it cannot simply be moved."""
    try:
        dicom = retry_transient(read_dicom, path, job.wanted)
    except FileNotFoundError:
        return Failed(path, Outcome.GONE, "vanished before it was read")
    except Incomplete as exc:
        return _incomplete(path, str(exc), job)
    except NotRegular as exc:
        return Failed(path, Outcome.QUARANTINED if not job.copy else Outcome.LEFT, str(exc))
    except Rejected as exc:
        return Failed(path, Outcome.QUARANTINED, str(exc))
    except OSError as exc:
        return Failed(path, Outcome.LEFT, os_reason(exc))
    except Exception as exc:
        # A file damaged in a way no reader expects (sequences nested thousands deep, a broken
        # zlib stream): a reason for the quarantine, never a crash on every run.
        log.warning("cannot read %s", job.shown(path), exc_info=True)
        return Failed(path, Outcome.QUARANTINED, f"unreadable file: {type(exc).__name__}: {str(exc)[:150]}")
    try:
        failpoints.hit("read", path)
        return _prepare_read(dicom, job)
    except Rejected as exc:
        return Failed(path, Outcome.QUARANTINED, str(exc), dicom.sha256)
    except OSError as exc:
        return Failed(path, Outcome.LEFT, os_reason(exc), dicom.sha256)
    except Exception as exc:
        log.exception("bug while sorting %s", job.shown(path))
        return Failed(path, Outcome.QUARANTINED, f"internal error: {exc!r}", dicom.sha256)
    finally:
        dicom.close()


MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: a DICOMDIR


def _incomplete(path: str, reason: str, job: Job) -> Failed:
    """A short file may still be arriving; quarantine it once it has been still for long enough."""
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return Failed(path, Outcome.GONE, "vanished before it was read")
    except OSError as exc:
        return Failed(path, Outcome.LEFT, os_reason(exc))
    if age < job.incomplete_timeout:
        return Failed(path, Outcome.LEFT, f"{STILL_ARRIVING}: {reason}")
    return Failed(path, Outcome.QUARANTINED, f"truncated: {reason}")


def _prepare_read(dicom: DicomFile, job: Job) -> Prepared:
    ds = dicom.ds
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")).strip(" \0") == MEDIA_DIRECTORY:
        # Copied from a CD or DVD with the images: it lacks a SOPInstanceUID, and saying only that
        # would send an operator looking for a damaged image.
        raise Rejected(f"a DICOMDIR (MediaStorageSOPClassUID {MEDIA_DIRECTORY}): the directory index of a DICOM "
                       "medium, not an image")
    sender = sender_of(ds) if job.senders is not None else ""
    if job.senders is not None and sender not in job.senders:
        raise Rejected(f"sender {printable(sender) or '(none named)'} not allowed "
                       f"(allowed_senders: {', '.join(sorted(job.senders))})")
    sop_uid = (header_text(ds, "SOPInstanceUID") or "").strip(" \0")
    if not sop_uid:
        raise Rejected("no SOPInstanceUID (0008,0018)")
    series_uid = (header_text(ds, "SeriesInstanceUID") or "").strip(" \0")
    if "InstanceNumber" in job.template.keywords and not _positive(header_text(ds, "InstanceNumber")):
        ds = dicom.full_header()  # the number is nested somewhere (Philips): search all of it
    facts = facts_of(ds, dicom.st.st_mtime)
    # Anonymise before naming: a path never holds a value that anonymising removed.
    header = None
    if job.anonymiser is not None:
        if dicom.trailing:  # elements after the pixel data are anonymised too: read it all
            ds = dicom.whole()
        found = job.anonymiser.apply(ds)
        sop_uid = (header_text(ds, "SOPInstanceUID") or "").strip(" \0")  # the journal never
        series_uid = (header_text(ds, "SeriesInstanceUID") or "").strip(" \0")  # holds the originals
        counted = facts_of(ds, dicom.st.st_mtime)  # the journal holds the anonymised values;
        counted.expected, counted.expected_from, counted.per_echo = facts.expected, facts.expected_from, facts.per_echo
        counted.sender = facts.sender  # the counts came from private data the profile removes
        facts = counted
        header = _encode_header(dicom)
        leaked = leak(header, found.needles)  # the pixel data is copied as it came
        if leaked:
            raise Rejected(f"leak check: the original value of {leaked} is still in the anonymised file")
    elif empty_fields(ds, job.anon_fields):
        header = _encode_header(dicom)
    name = friendly_name(ds, job.template, job.reserved)
    prepared = Prepared(dicom.path, dicom.sha256, dicom.sha256, dicom.size, dicom.st.st_dev,
                        dicom.st.st_ino, dicom.size, dicom.st.st_mtime_ns, sop_uid, series_uid, name,
                        dicom.body_size, facts=facts)
    if job.dry_run:
        if header is not None:
            _digest_of(dicom, header, prepared, identity=True)
        return prepared
    # A file with more than one link is also another name's file (a link made in the dump to
    # someone's image elsewhere): moving it would put that inode in the tree, and the chmod
    # and chgrp below would change it for its other name. It is copied; the dump's link goes.
    if header is not None or job.copy or dicom.st.st_dev != job.out_device or dicom.st.st_nlink > 1:
        _stage(dicom, prepared, header, job)
    else:
        # Moved as it is. storescp never fsyncs: a file written moments ago may not be on disk
        # yet, and must be before it has a name in the tree; the sorter syncs once per batch.
        # Start writing a fresh file back now, without waiting: that sync then finds little
        # left to write. Its age is its ctime, which no copy tool can set back.
        prepared.fresh = time.time() - dicom.st.st_ctime < WRITEBACK_SECONDS
        if prepared.fresh:
            linux.start_writeback(dicom.fd)
        set_owner_mode(dicom.fd, job.file_mode, job.gid, dicom.st)
    failpoints.hit("prepared")
    return prepared


def _positive(text: str | None) -> bool:
    try:
        return float((text or "").split("\\")[0]) > 0
    except ValueError:
        return False


def _encode_header(dicom: DicomFile) -> bytes:
    """The changed header, in the file's own encoding; the pixel data is copied after it as is."""
    buffer = io.BytesIO()
    # In the data set's own encoding, not the one its file meta names: they differ when the
    # meta names the wrong VR (read as it is), and the pixel data after it is copied as it is.
    implicit, little = dicom.ds.original_encoding
    dcmwrite(buffer, dicom.ds, enforce_file_format=False, implicit_vr=implicit, little_endian=little,
             force_encoding=True)
    return buffer.getvalue()


def _digest_of(dicom: DicomFile, header: bytes, prepared: Prepared, identity: bool = False) -> None:
    """The sha256, size and data set size of the bytes to place: the changed header, then
    the file's own bytes from its pixel data on; with identity, their data-set identity too."""
    digests = [hashlib.sha256(header)]
    start, syntax = meta_end(header, len(header)) or (0, "")
    if identity:
        digests.append(hashlib.sha256(syntax.encode("ascii", "replace") + b"\0" + memoryview(header)[start:]))
    if dicom.data is not None:
        for digest in digests:
            digest.update(memoryview(dicom.data)[dicom.tail :])
    else:
        offset = dicom.tail
        while chunk := os.pread(dicom.fd, 1 << 20, offset):
            for digest in digests:
                digest.update(chunk)
            offset += len(chunk)
    prepared.out_sha256, prepared.size = digests[0].hexdigest(), len(header) + dicom.size - dicom.tail
    prepared.body_size = prepared.size - start
    if identity:
        prepared.identity = digests[1].hexdigest()


def _stage(dicom: DicomFile, prepared: Prepared, header: bytes | None, job: Job) -> None:
    """Write the bytes to place into the staging folder, fsynced, under a name with our pid."""
    assert job.staging is not None
    fd = _staging_fds.get((job.staging, job.staging_id))
    if fd is None:
        # The folder the sorter proved, or none: a worker opens it by its name, which a swap
        # of .dumpwatch since could point elsewhere.
        fd = os.open(job.staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != job.staging_id:
            os.close(fd)
            raise OSError(errno.ESTALE, "the staging folder is not the one dumpwatch checked at its start")
        _staging_fds[(job.staging, job.staging_id)] = fd
    name = staged_name()
    start = 0 if header is None else dicom.tail

    def fill(out: int) -> None:
        if header is not None:
            write_all(out, header)
        if dicom.data is not None:
            write_all(out, memoryview(dicom.data)[start:])
        else:
            copy_range(dicom.fd, out, start, dicom.size - start)

    try:
        retry_transient(write_new, fd, name, fill, job.file_mode, job.gid)
    except OSError as exc:
        if exc.errno not in _STAGING_ERRORS:
            raise
        # Say where: a full disk here is the tree's, which the dump's own may not be.
        raise OSError(exc.errno, f"{exc.strerror or exc} in the staging folder {job.staging}") from None
    prepared.staged = name
    if header is not None:
        _digest_of(dicom, header, prepared)
