"""The configuration file: DcmServer.cfg's flat `key = value` format, read once at start-up."""

from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict

from dumpwatch.configkeys import KEYS, LEGACY_UNUSED, NOTIFY_EVENTS, STATE_DIR
from dumpwatch.errors import ConfigError, ConfigErrors
from dumpwatch.hooks import Template as HookTemplate
from dumpwatch.hooks import check_output_dir
from dumpwatch.keys import load_subjects
from dumpwatch.naming import DEFAULT_TEMPLATE, Template
from dumpwatch.rules import RULES_DIR, Profile, find_layer, load_profile

ENV_VAR = "DUMPWATCH_CONFIG"
DEFAULT_FILE = "dumpwatch.cfg"


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
    disk_warn: int = 85
    disk_alarm: int = 95
    in_hand: int = 20_000
    series_idle: float = 60.0
    study_idle: float = 600.0
    allowed_senders: tuple[str, ...] = ()
    anon_profile: tuple[str, ...] = ()
    rules_dir: Path | None = None
    anon_key: Path | None = None
    anon_subjects: Path | None = None
    anon_burned_in: str = "quarantine"
    on_series_complete: HookTemplate | None = None
    on_study_complete: HookTemplate | None = None
    hook_when: str = "whole"
    hook_output_dir: Path | None = None
    hook_workers: int = 1
    hook_timeout: float = 3600.0
    hook_retries: int = 1
    hook_retry_wait: float = 30.0
    hook_rerun: bool = True
    notify_email: tuple[str, ...] = ()
    notify_from: str = ""
    smtp_host: str = "localhost"
    smtp_port: int | None = None
    smtp_security: str = "starttls"
    smtp_user: str | None = None
    smtp_password_file: Path | None = None
    smtp_ca_file: Path | None = None
    notify_webhook: str | None = None
    notify_on: tuple[str, ...] = NOTIFY_EVENTS
    notify_interval: float = 300.0
    notify_identifiers: bool = False
    health_interval: float = 30.0
    web_bind: str = "127.0.0.1"
    web_port: int = 11180
    web_passwords: Path | None = None
    web_hosts: tuple[str, ...] = ()
    web_refresh: int = 30
    web_days: int = 7
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
    def hooks(self) -> bool:
        return self.on_series_complete is not None or self.on_study_complete is not None

    @property
    def channels(self) -> tuple[str, ...]:
        """Where notices go: email, webhook, both or neither."""
        return (("email",) if self.notify_email else ()) + (("webhook",) if self.notify_webhook else ())

    @property
    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def replace(self, **changes: Any) -> Config:
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
            elif key in ("disk_warn", "disk_alarm"):
                shown = f"{value}%"
            elif key == "workers":
                shown = f"{self.worker_count}" + ("" if self.workers else " (auto)")
            elif key == "group":
                shown = "(unchanged)" if value is None else _group_name(value)
            elif key == "template" or (value is not None and KEYS[key].kind == "hook"):
                shown = value.text
            elif isinstance(value, bool):
                shown = "yes" if value else "no"
            elif isinstance(value, tuple):
                shown = ", ".join(value) or "(none)"
            elif key == "smtp_port" and value is None:
                shown = str(smtp_port(self))
            elif key == "notify_from" and not value:
                shown = notify_from(self)
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


def smtp_port(cfg: Config) -> int:
    if cfg.smtp_port is not None:
        return cfg.smtp_port
    return {"tls": 465, "none": 25}.get(cfg.smtp_security, 587)


def notify_from(cfg: Config) -> str:
    return cfg.notify_from or f"dumpwatch@{socket.getfqdn()}"


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
    reading = _Reading(path)
    reading.read_lines(text)
    values, seen, errors = reading.values, reading.seen, reading.errors
    explicit = frozenset(values) | (frozenset(["anon_fields"]) if "anon_fields" in seen else frozenset())
    anon_fields = tuple(dict.fromkeys(reading.anon))
    profile, subjects = _anonymisation(reading, anon_fields)
    cfg = Config(
        path=path,
        anon_fields=anon_fields,
        unused=tuple(reading.unused),
        explicit=explicit,
        profile=profile,
        subjects=subjects,
        **values,  # type: ignore[arg-type]  # each value is of its key's type, as KEYS parses it
    )
    try:
        check_layout(cfg)  # on the keys that were read well
    except ConfigError as exc:
        errors.append(exc)
    errors += _after_the_scan(cfg, reading.seen)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
    return cfg


class _Reading:
    """One pass over a configuration file's lines: the values read well, and every mistake."""

    def __init__(self, path: Path):
        self.path = path
        self.base = path.resolve().parent
        self.values: dict[str, object] = {}
        self.seen: dict[str, int] = {}  # key -> the line that gave it
        self.unused: list[str] = []
        self.anon: list[int] = []
        self.errors: list[ConfigError] = []

    def mistake(self, message: str, line: int | None = None, key: str | None = None) -> None:
        self.errors.append(ConfigError(message, self.path, line, key))

    def read_lines(self, text: str) -> None:
        """Every line in turn; anon_fields' tags may go on, indented, on the lines below it."""
        in_anon = False
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.rstrip()
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if line[0].isspace():
                if not in_anon:
                    self.mistake("an indented line belongs below an anon_fields line", number)
                    continue
                self.tag(_INLINE_COMMENT.sub("", stripped).split()[0], number)
                continue
            in_anon = self.key_line(stripped, number)

    def key_line(self, stripped: str, number: int) -> bool:
        """One `key = value` line; True when it is anon_fields (indented tags may follow)."""
        match = _KEY_LINE.fullmatch(stripped)
        if not match:
            self.mistake("expected 'key = value'", number)
            return False
        key, value = match[1].lower(), match[2]
        if key in self.seen:
            self.mistake(f"given twice (first on line {self.seen[key]})", number, key)
            return False
        self.seen[key] = number
        if key == "anon_fields":
            for tag_text in _INLINE_COMMENT.sub("", value or "").replace(";", " ").split():
                self.tag(tag_text, number)
            return True
        if value is None:
            self.mistake("expected 'key = value'", number, key)
            return False
        value = _INLINE_COMMENT.sub("", value).strip()
        if key in LEGACY_UNUSED:
            self.unused.append(match[1])  # as the file spells it
            return False
        self.value(key, value, number)
        return False

    def tag(self, text: str, number: int) -> None:
        """One tag of anon_fields."""
        tag = _parse_tag(text)
        if tag is None:
            self.mistake(f"not a tag such as 0010,0010: {text!r}", number, "anon_fields")
        else:
            self.anon.append(tag)

    def value(self, key: str, value: str, number: int) -> None:
        """A key's value, parsed as KEYS says; a path is taken from the file's folder."""
        spec = KEYS.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(KEYS) + ["anon_fields"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.mistake(f"unknown key{hint}", number, key)
            return
        if value == "":
            if spec.blank_ok:
                self.values[key] = None
            else:
                self.mistake("needs a value", number, key)
            return
        try:
            parsed = spec.parse(value)
        except (ValueError, ConfigError) as exc:
            self.mistake(str(exc), number, key)
            return
        if spec.kind == "path":
            parsed = self.base / Path(os.path.expanduser(str(parsed)))
            parsed = Path(os.path.normpath(parsed))
        self.values[key] = parsed


def _after_the_scan(cfg: Config, seen: dict[str, int]) -> list[ConfigError]:
    """Mistakes between the hook and notice keys, each named by its line."""
    errors = []
    where = cfg.path
    if cfg.hook_output_dir is not None:
        try:
            check_output_dir(str(cfg.hook_output_dir))
        except ValueError as exc:
            errors.append(ConfigError(str(exc), where, seen.get("hook_output_dir"), "hook_output_dir"))
    uses_output = any(t is not None and "output_dir" in t.names() for t in (cfg.on_series_complete,
                                                                           cfg.on_study_complete))
    if uses_output and cfg.hook_output_dir is None:
        line = seen.get("on_series_complete") or seen.get("on_study_complete")
        errors.append(ConfigError("{output_dir} needs hook_output_dir (the folder it names, e.g. "
                                  "/data/nifti/{subject})", where, line, "hook_output_dir"))
    if cfg.smtp_user and cfg.smtp_password_file is None:
        errors.append(ConfigError("a login needs smtp_password_file (the file holding its password)", where,
                                  seen.get("smtp_user"), "smtp_password_file"))
    if cfg.web_port == cfg.port:
        errors.append(ConfigError(f"web_port is {cfg.web_port}, storescp's port: choose another", where,
                                  seen.get("web_port") or seen.get("port"), "web_port"))
    if cfg.disk_warn > cfg.disk_alarm:
        errors.append(ConfigError(f"disk_warn ({cfg.disk_warn}%) is above disk_alarm ({cfg.disk_alarm}%): the "
                                  "warning comes first", where, seen.get("disk_warn"), "disk_warn"))
    return errors


def _parse_tag(text: str) -> int | None:
    match = re.fullmatch(r"\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?", text)
    if match:
        return int(match[1] + match[2], 16)
    if text in keyword_dict:
        return keyword_dict[text]
    return None


def _anonymisation(reading: _Reading, anon_fields: tuple[int, ...]) -> tuple[Profile | None, dict[str, str] | None]:
    """anon_profile's rule layers, compiled, and anon_subjects' table, read: (profile, subjects).
    A mistake in either joins the file's own."""
    values, path, base = reading.values, reading.path, reading.base
    profile = subjects = None
    if "anon_profile" in values:
        names = values["anon_profile"]
        rules_dir = values.get("rules_dir") or RULES_DIR
        assert isinstance(names, tuple) and isinstance(rules_dir, Path)  # as KEYS parses them
        missing = [name for name in names if not find_layer(name, rules_dir, base).is_file()]
        for name in missing:
            reading.mistake(f"no rule layer {name!r} (in {rules_dir}, or a path to a .toml file)",
                            reading.seen["anon_profile"], "anon_profile")
        if not missing:
            try:
                profile = load_profile(list(names), rules_dir, base, anon_fields, path)
            except ConfigError as exc:  # a mistake in a rule layer: named by its own file and line
                reading.errors.append(exc)
    subjects_path = values.get("anon_subjects")
    if subjects_path:
        assert isinstance(subjects_path, Path)  # a path key, or None when left blank
        try:
            subjects = load_subjects(subjects_path)
        except ConfigError as exc:
            reading.errors.append(exc)
    return profile, subjects
