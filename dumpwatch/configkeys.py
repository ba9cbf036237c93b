"""The configuration file's keys: how each value is parsed, its default as the README gives it, its help."""

from __future__ import annotations

import grp
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from dumpwatch.hooks import FIELDS, SERIES, STUDY
from dumpwatch.hooks import Template as HookTemplate
from dumpwatch.naming import DEFAULT_TEMPLATE, Template

STATE_DIR = ".dumpwatch"  # inside dir_out: journal, lock and staging area

# DcmServer keys that dumpwatch reads but has no use for.
LEGACY_UNUSED = {
    "user": "run the service as this user with supervisord or systemd instead",
    "renamedicom": "dumpwatch sorts by itself; storescp no longer runs a script per file",
}


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            number = int(text, 10)
        except ValueError:
            raise ValueError(f"not a whole number: {text!r}") from None
        if not low <= number <= high:
            raise ValueError(f"{number} is outside {low}..{high}")
        return number

    return parse


def _seconds_from(low: float):
    """A parser of seconds, at least `low`: a wait of 0 would make serve spin on the CPU."""

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"not a number of seconds: {text!r}") from None
        if not low <= number < 10**7:
            raise ValueError(f"{text} seconds is out of range {low:g}..10000000")
        return number

    return parse


_seconds = _seconds_from(0)


def _percent(text: str) -> int:
    number = text.strip().removesuffix("%").strip()
    if not number.isdigit() or not 1 <= int(number) <= 100:
        raise ValueError(f"a whole percentage from 1 to 100, such as 85%: {text!r}")
    return int(number)


def _bind(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"an IP address of this machine, such as 127.0.0.1 or 0.0.0.0 (all): {text!r}") from None
    return text


def _hosts(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    for name in names:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", name):
            raise ValueError(f"not a host name such as mri-sort.example.org: {name!r}")
    return names


def _aetitle(text: str) -> str:
    if not 1 <= len(text) <= 16:
        raise ValueError(f"an AE title has 1 to 16 characters, {text!r} has {len(text)}")
    if not all(32 <= ord(c) < 127 and c != "\\" for c in text):
        raise ValueError(f"an AE title is plain ASCII without backslashes: {text!r}")
    return text


def _extension(text: str) -> str:
    text = text.lstrip(".")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,16}", text):
        raise ValueError(f"an extension is 1 to 16 letters, digits, '-' or '_': {text!r}")
    return text


def _mode(limit: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            mode = int(text, 8)
        except ValueError:
            raise ValueError(f"not an octal mode such as 0664: {text!r}") from None
        if not 0 <= mode <= limit:
            raise ValueError(f"mode {text} is out of range (at most {limit:o})")
        return mode

    return parse


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no such group on this machine: {text!r}") from None


def _observer(text: str) -> str:
    if text.lower() not in ("inotify", "polling"):
        raise ValueError(f"either inotify (a local disk) or polling (NFS, SMB): {text!r}")
    return text.lower()


def _burned_in(text: str) -> str:
    if text.lower() not in ("quarantine", "allow"):
        raise ValueError(f"quarantine (the default) or allow: {text!r}")
    return text.lower()


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("name at least one rule layer, e.g. basic")
    return names


def _senders(text: str) -> tuple[str, ...]:
    """AE titles separated by commas; blank: any sender."""
    return tuple(dict.fromkeys(_aetitle(n.strip()) for n in text.split(",") if n.strip()))


def _workers(text: str) -> int:
    if text.lower() == "auto":
        return 0
    return _int_in(1, 64)(text)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"one of {', '.join(choices)}: {text!r}")
        return text.lower()

    return parse


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "on", "1"):
        return True
    if text.lower() in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"yes or no: {text!r}")


def _hook(kind: str) -> Callable[[str], HookTemplate]:
    def parse(text: str) -> HookTemplate:
        return HookTemplate.parse(text, FIELDS[kind])

    return parse


def _emails(text: str) -> tuple[str, ...]:
    addresses = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    for address in addresses:
        if not re.fullmatch(r"[^@\s<>,]+@[^@\s<>,]+", address):
            raise ValueError(f"not an e-mail address such as physics@example.org: {address!r}")
    return addresses


def _address(text: str) -> str:
    return _emails(text)[0] if _emails(text) else text


def _url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s]+", text):
        raise ValueError(f"an http:// or https:// address: {text!r}")
    return text


NOTIFY_EVENTS = ("study_complete", "quarantine", "health")


def _events(text: str) -> tuple[str, ...]:
    events = tuple(dict.fromkeys(e.strip().lower() for e in text.split(",") if e.strip()))
    for event in events:
        if event not in NOTIFY_EVENTS:
            raise ValueError(f"unknown event {event!r} (known: {', '.join(NOTIFY_EVENTS)})")
    return events


@dataclass(frozen=True)
class Key:
    parse: Callable[[str], object]
    default: str  # as written in the README
    help: str
    kind: str = "value"  # "value", "path", "template" or "hook"
    blank_ok: bool = False


KEYS: dict[str, Key] = {
    "port": Key(_int_in(1, 65535), "11112", "TCP port storescp listens on"),
    "aetitle": Key(_aetitle, "DUMPWATCH", "AE title of the receiver, as entered on the scanner"),
    "dir_dump": Key(str, "(none)", "folder storescp writes received files into", kind="path"),
    "dir_out": Key(str, "(none)", "root of the sorted tree", kind="path"),
    "dir_quarantine": Key(
        str,
        "quarantine/ beside dir_dump",
        "rejected files and their reasons; never inside dir_out",
        kind="path",
    ),
    "journal": Key(
        str, f"<dir_out>/{STATE_DIR}/journal.sqlite3", "SQLite journal of every outcome", kind="path"
    ),
    "template": Key(Template.parse, DEFAULT_TEMPLATE, "where a file goes, below dir_out", kind="template"),
    "extension": Key(_extension, "dcm", "file name extension of sorted files"),
    "file_mode": Key(_mode(0o777), "0664", "permission bits of sorted files"),
    "dir_mode": Key(_mode(0o7777), "2775", "permission bits of folders dumpwatch creates"),
    "group": Key(_group, "(unchanged)", "group given to sorted files and folders", blank_ok=True),
    "fname_log": Key(str, "(blank: no log file)", "log file, reopened when logrotate moves it",
                     kind="path", blank_ok=True),
    "workers": Key(_workers, "auto", "processes that read headers in parallel (auto: one per CPU)"),
    "incomplete_timeout": Key(
        _seconds, "60", "seconds a truncated file may still be arriving before it is quarantined"
    ),
    "observer": Key(_observer, "inotify", "how serve sees new files: inotify, or polling for NFS/SMB dumps"),
    "stable_seconds": Key(_seconds_from(0.1), "2",
                          "a file unchanged this long, open in no process, is finished (polling, sweeps)"),
    "sweep_interval": Key(_seconds_from(1), "60", "seconds between sweeps of the dump for files an event missed"),
    "backlog_alarm": Key(_seconds, "300", "status is unhealthy when a file has waited in the dump this long"),
    "disk_warn": Key(_percent, "85%", "status and the web page warn when a filesystem of the tree, the quarantine "
                     "or the dump is this full"),
    "disk_alarm": Key(_percent, "95%", "status is unhealthy when one is this full (nothing is ever deleted to make "
                      "room)"),
    "in_hand": Key(_int_in(100, 10**7), "20000", "files serve holds in memory at most; beyond, the dump is the "
                   "queue and sweeps take more as these are done"),
    "series_idle": Key(_seconds_from(1), "60", "a series is complete once no file of it arrived for this long "
                       "and none waits in the dump"),
    "study_idle": Key(_seconds_from(1), "600", "a study is complete once all its series are and nothing of it "
                      "arrived for this long"),
    "allowed_senders": Key(_senders, "(any)", "calling AE titles whose files serve sorts, separated by commas; "
                           "files from others go to the quarantine", blank_ok=True),
    "anon_profile": Key(_names, "(none)", "rule layers to anonymise with, in order, e.g. basic, retain-uids, site"),
    "rules_dir": Key(str, "the layers shipped with dumpwatch", "where anon_profile finds layers by name", kind="path"),
    "anon_key": Key(str, f"<dir_out>/{STATE_DIR}/anon.key", "the site's secret for new UIDs, pseudonyms and "
                    "date shifts; made (mode 0600) on first use", kind="path"),
    "anon_subjects": Key(str, "(none: pseudonyms from the key)", "CSV of PatientID or PatientName -> subject code",
                         kind="path", blank_ok=True),
    "anon_burned_in": Key(_burned_in, "quarantine", "files whose BurnedInAnnotation is YES: quarantine or allow"),
    # After the scan: hooks (hooks.py) and notices (notify.py), run by serve (actions.py).
    "on_series_complete": Key(_hook(SERIES), "(none)", "program and arguments run for each complete series, e.g. "
                              "dcm2niix -z y -o {output_dir} {series_dir}; never through a shell", kind="hook",
                              blank_ok=True),
    "on_study_complete": Key(_hook(STUDY), "(none)", "program and arguments run for each complete study, e.g. "
                             "heudiconv or dcm2bids on {study_dir}", kind="hook", blank_ok=True),
    "hook_when": Key(_choice("whole", "always"), "whole", "whole: run only when no image is known to be missing "
                     "(the converter's exit status cannot tell); always: run for every completion"),
    "hook_output_dir": Key(str, "(none)", "a folder made before each hook runs, given as {output_dir}; may hold "
                           "{subject}, {study_date}, ...", kind="path", blank_ok=True),
    "hook_workers": Key(_int_in(1, 16), "1", "hooks running at once at most"),
    "hook_timeout": Key(_seconds_from(1), "3600", "seconds a hook may run before its whole process group is killed"),
    "hook_retries": Key(_int_in(0, 10), "1", "times a failed hook is run again"),
    "hook_retry_wait": Key(_seconds_from(0), "30", "seconds before the first retry (doubling after each)"),
    "hook_rerun": Key(_yes_no, "yes", "run a series' or study's hook again when a late file reopened it and it "
                      "completed again"),
    "notify_email": Key(_emails, "(none)", "addresses told of complete studies, quarantined files and health, "
                        "separated by commas", blank_ok=True),
    "notify_from": Key(_address, "dumpwatch@<this host>", "the sender address of notices"),
    "smtp_host": Key(str, "localhost", "the mail server notices go through"),
    "smtp_port": Key(_int_in(1, 65535), "587 (465 with smtp_security = tls, 25 with none)", "its port",
                     blank_ok=True),
    "smtp_security": Key(_choice("starttls", "tls", "none"), "starttls",
                         "starttls, tls (SMTPS), or none (a relay on this machine only)"),
    "smtp_user": Key(str, "(none: no login)", "the login for the mail server", blank_ok=True),
    "smtp_password_file": Key(str, "(none)", "a file (mode 0600) holding the mail server's password", kind="path",
                              blank_ok=True),
    "smtp_ca_file": Key(str, "(the system's)", "certificates the mail server's is checked against", kind="path",
                        blank_ok=True),
    "notify_webhook": Key(_url, "(none)", "an address each notice is POSTed to as JSON (Slack, Mattermost, Teams, "
                          "a site's own)", blank_ok=True),
    "notify_on": Key(_events, ", ".join(NOTIFY_EVENTS), "what notices are sent for: " + ", ".join(NOTIFY_EVENTS)),
    "notify_interval": Key(_seconds_from(1), "300", "seconds between notices of quarantined files at most (they "
                           "come in one message)"),
    "notify_identifiers": Key(_yes_no, "no", "name the study's folder (often the patient's name) in notices"),
    "health_interval": Key(_seconds_from(1), "30", "seconds between serve's checks of health, for notices"),
    # The operators' view: `dumpwatch web` (web.py).
    "web_bind": Key(_bind, "127.0.0.1", "the address the status page and /metrics listen on; beyond loopback only "
                    "with web_passwords"),
    "web_port": Key(_int_in(1, 65535), "11180", "their TCP port"),
    "web_passwords": Key(str, "(none: no login)", "a file of users and hashed passwords (dumpwatch web-password) "
                         "the page and /metrics ask for", kind="path", blank_ok=True),
    "web_hosts": Key(_hosts, "(none: addresses and localhost)", "host names the page answers to without "
                     "web_passwords, separated by commas (e.g. the name a reverse proxy passes on)", blank_ok=True),
    "web_refresh": Key(_int_in(5, 3600), "30", "seconds between the page's own refreshes"),
    "web_days": Key(_int_in(1, 365), "7", "days of studies the page shows"),
}
