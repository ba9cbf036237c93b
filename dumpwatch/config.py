"""The configuration file: DcmServer.cfg's flat `key = value` format, read once at start-up."""

from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_dict

from dumpwatch.errors import ConfigError, ConfigErrors
from dumpwatch.keys import load_subjects
from dumpwatch.naming import DEFAULT_TEMPLATE, Template
from dumpwatch.rules import RULES_DIR, Profile, find_layer, load_profile

ENV_VAR = "DUMPWATCH_CONFIG"
DEFAULT_FILE = "dumpwatch.cfg"
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


def _workers(text: str) -> int:
    if text.lower() == "auto":
        return 0
    return _int_in(1, 64)(text)


@dataclass(frozen=True)
class Key:
    parse: Callable[[str], object]
    default: str  # as written in the README
    help: str
    kind: str = "value"  # "value", "path" or "template"
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
    "in_hand": Key(_int_in(100, 10**7), "20000", "files serve holds in memory at most; beyond, the dump is the "
                   "queue and sweeps take more as these are done"),
    "anon_profile": Key(_names, "(none)", "rule layers to anonymise with, in order, e.g. basic, retain-uids, site"),
    "rules_dir": Key(str, "the layers shipped with dumpwatch", "where anon_profile finds layers by name", kind="path"),
    "anon_key": Key(str, f"<dir_out>/{STATE_DIR}/anon.key", "the site's secret for new UIDs, pseudonyms and "
                    "date shifts; made (mode 0600) on first use", kind="path"),
    "anon_subjects": Key(str, "(none: pseudonyms from the key)", "CSV of PatientID or PatientName -> subject code",
                         kind="path", blank_ok=True),
    "anon_burned_in": Key(_burned_in, "quarantine", "files whose BurnedInAnnotation is YES: quarantine or allow"),
}


def _parse_tag(text: str) -> int | None:
    match = re.fullmatch(r"\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?", text)
    if match:
        return int(match[1] + match[2], 16)
    if text in keyword_dict:
        return keyword_dict[text]
    return None


@dataclass(frozen=True)
class Config:
    """Everything dumpwatch needs to know, built once and passed down."""

    path: Path | None = None  # the file it was read from, if any
    port: int = 11112
    aetitle: str = "DUMPWATCH"
    dir_dump: Path | None = None
    dir_out: Path | None = None
    dir_quarantine: Path | None = None
    journal: Path | None = None
    template: Template = field(default_factory=lambda: Template.parse(DEFAULT_TEMPLATE))
    extension: str = "dcm"
    file_mode: int = 0o664
    dir_mode: int = 0o2775
    group: int | None = None
    fname_log: Path | None = None
    workers: int = 0
    incomplete_timeout: float = 60.0
    observer: str = "inotify"
    stable_seconds: float = 2.0
    sweep_interval: float = 60.0
    backlog_alarm: float = 300.0
    in_hand: int = 20_000
    anon_profile: tuple[str, ...] = ()
    rules_dir: Path | None = None
    anon_key: Path | None = None
    anon_subjects: Path | None = None
    anon_burned_in: str = "quarantine"
    profile: Profile | None = None  # anon_profile's layers, compiled
    subjects: dict[str, str] | None = None  # anon_subjects, read
    anon_fields: tuple[int, ...] = ()
    unused: tuple[str, ...] = ()  # legacy keys that were given and are ignored
    explicit: frozenset[str] = frozenset()  # keys the file set

    @property
    def quarantine_dir(self) -> Path | None:
        """The quarantine: as configured, else beside the dump, else beside the sorted tree."""
        if self.dir_quarantine is not None:
            return self.dir_quarantine
        if self.dir_dump is None:
            return None
        beside_dump = self.dir_dump.parent / "quarantine"
        if self.dir_out is not None and _inside(beside_dump, self.dir_out):
            # A DcmServer layout keeps the dump inside dir_out; keep quarantine out of the tree.
            return self.dir_out.parent / "quarantine"
        return beside_dump

    @property
    def state_dir(self) -> Path | None:
        return None if self.dir_out is None else self.dir_out / STATE_DIR

    @property
    def journal_path(self) -> Path | None:
        if self.journal is not None:
            return self.journal
        return None if self.state_dir is None else self.state_dir / "journal.sqlite3"

    @property
    def anon_key_path(self) -> Path | None:
        if self.anon_key is not None:
            return self.anon_key
        return None if self.state_dir is None else self.state_dir / "anon.key"

    @property
    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)

    def effective(self) -> list[tuple[str, str, str]]:
        """(key, value, where it came from) for `dumpwatch check-config`."""
        rows = []
        for key in KEYS:
            value = getattr(self, key)
            if key == "dir_quarantine":
                value = self.quarantine_dir
            elif key == "journal":
                value = self.journal_path
            elif key == "anon_key":
                value = self.anon_key_path
            elif key == "rules_dir":
                value = self.rules_dir or RULES_DIR
            elif key == "anon_profile":
                value = ", ".join(value) if value else None
            if key in ("file_mode", "dir_mode"):
                shown = f"{value:04o}"
            elif key == "workers":
                shown = f"{self.worker_count}" + ("" if self.workers else " (auto)")
            elif key == "group":
                shown = "(unchanged)" if value is None else _group_name(value)
            elif key == "template":
                shown = value.text
            elif value is None:
                shown = "(none)"
            else:
                shown = str(value)
            origin = "file" if key in self.explicit else "default"
            rows.append((key, shown, origin))
        tags = ", ".join(f"{t >> 16:04X},{t & 0xFFFF:04X}" for t in self.anon_fields)
        rows.append(("anon_fields", tags or "(none)", "file" if "anon_fields" in self.explicit else "default"))
        return rows

    def layout_warnings(self) -> list[str]:
        """Folder layouts that work but that an operator should know about."""
        notes = []
        if self.dir_dump and self.dir_out and _inside(self.dir_dump, self.dir_out):
            notes.append(
                f"dir_dump ({self.dir_dump}) is inside dir_out ({self.dir_out}), as DcmServer set it up; "
                "it works, but a dump beside dir_out keeps the sorted tree tidy"
            )
        return notes


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)


def _inside(path: Path, parent: Path) -> bool:
    """True when path is parent or lies below it (both taken as absolute)."""
    path, parent = Path(os.path.abspath(path)), Path(os.path.abspath(parent))
    return path == parent or parent in path.parents


def check_layout(cfg: Config) -> None:
    """Refuse folder layouts that could mix the dump, the quarantine and the sorted tree."""
    out, dump, quarantine = cfg.dir_out, cfg.dir_dump, cfg.quarantine_dir
    where = cfg.path
    if out is not None and dump is not None and os.path.abspath(out) == os.path.abspath(dump):
        raise ConfigError("dir_dump and dir_out must be different folders", where, key="dir_out")
    if out is not None and quarantine is not None:
        if _inside(quarantine, out):
            raise ConfigError(
                f"{quarantine} is inside the sorted tree {out}; choose a folder outside it",
                where,
                key="dir_quarantine",
            )
        if _inside(out, quarantine):
            raise ConfigError(f"dir_out ({out}) is inside the quarantine {quarantine}", where, key="dir_out")
    if dump is not None and quarantine is not None and _inside(quarantine, dump):
        raise ConfigError(
            f"{quarantine} is inside the dump {dump}; the watcher would pick quarantined files up again",
            where,
            key="dir_quarantine",
        )


def find_config_file(option: str | os.PathLike | None) -> Path | None:
    """--config FILE, else $DUMPWATCH_CONFIG, else ./dumpwatch.cfg if it exists, else none."""
    if option:
        path = Path(option)
        if not path.is_file():
            raise ConfigError("no such configuration file", path)
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"no such configuration file (named by ${ENV_VAR})", path)
        return path
    path = Path(DEFAULT_FILE)
    return path if path.is_file() else None


def load_config(option: str | os.PathLike | None = None) -> Config:
    """Find and read the configuration; with no file at all, the defaults."""
    path = find_config_file(option)
    return read_config(path) if path else Config()


_KEY_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=(.*))?")
_INLINE_COMMENT = re.compile(r"\s+#.*$")


def read_config(path: Path) -> Config:
    """Parse one configuration file. Errors name the file, the line and the key; every
    mistake in the file is reported at once (ConfigErrors), not only the first."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason})", path) from None
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), path) from None
    base = path.resolve().parent
    values: dict[str, object] = {}
    seen: dict[str, int] = {}
    unused: list[str] = []
    anon: list[int] = []
    in_anon = False
    errors: list[ConfigError] = []

    def mistake(message: str, line: int | None = None, key: str | None = None) -> None:
        errors.append(ConfigError(message, path, line, key))

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if not in_anon:
                mistake("an indented line belongs below an anon_fields line", number)
                continue
            tag_text = _INLINE_COMMENT.sub("", stripped).split()[0]
            tag = _parse_tag(tag_text)
            if tag is None:
                mistake(f"not a tag such as 0010,0010: {tag_text!r}", number, "anon_fields")
            else:
                anon.append(tag)
            continue
        in_anon = False
        match = _KEY_LINE.fullmatch(stripped)
        if not match:
            mistake("expected 'key = value'", number)
            continue
        key, value = match[1].lower(), match[2]
        if key in seen:
            mistake(f"given twice (first on line {seen[key]})", number, key)
            continue
        seen[key] = number
        if key == "anon_fields":
            in_anon = True
            for tag_text in _INLINE_COMMENT.sub("", value or "").replace(";", " ").split():
                tag = _parse_tag(tag_text)
                if tag is None:
                    mistake(f"not a tag such as 0010,0010: {tag_text!r}", number, key)
                else:
                    anon.append(tag)
            continue
        if value is None:
            mistake("expected 'key = value'", number, key)
            continue
        value = _INLINE_COMMENT.sub("", value).strip()
        if key in LEGACY_UNUSED:
            unused.append(match[1])  # as the file spells it
            continue
        spec = KEYS.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(KEYS) + ["anon_fields"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            mistake(f"unknown key{hint}", number, key)
            continue
        if value == "":
            if spec.blank_ok:
                values[key] = None
            else:
                mistake("needs a value", number, key)
            continue
        try:
            parsed = spec.parse(value)
        except (ValueError, ConfigError) as exc:
            mistake(str(exc), number, key)
            continue
        if spec.kind == "path":
            parsed = base / Path(os.path.expanduser(str(parsed)))
            parsed = Path(os.path.normpath(parsed))
        values[key] = parsed

    explicit = frozenset(values) | (frozenset(["anon_fields"]) if "anon_fields" in seen else frozenset())
    anon_fields = tuple(dict.fromkeys(anon))
    profile = subjects = None
    if "anon_profile" in values:
        names = values["anon_profile"]
        rules_dir = values.get("rules_dir") or RULES_DIR
        missing = [name for name in names  # type: ignore[union-attr]
                   if not find_layer(name, rules_dir, base).is_file()]  # type: ignore[arg-type]
        for name in missing:
            mistake(f"no rule layer {name!r} (in {rules_dir}, or a path to a .toml file)",
                    seen["anon_profile"], "anon_profile")
        if not missing:
            try:
                profile = load_profile(list(names), rules_dir, base, anon_fields, path)  # type: ignore[arg-type]
            except ConfigError as exc:  # a mistake in a rule layer: named by its own file and line
                errors.append(exc)
    if values.get("anon_subjects"):
        try:
            subjects = load_subjects(values["anon_subjects"])  # type: ignore[arg-type]
        except ConfigError as exc:
            errors.append(exc)
    cfg = Config(
        path=path,
        anon_fields=anon_fields,
        unused=tuple(unused),
        explicit=explicit,
        profile=profile,
        subjects=subjects,
        **values,  # type: ignore[arg-type]
    )
    try:
        check_layout(cfg)  # on the keys that were read well
    except ConfigError as exc:
        errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
    return cfg
