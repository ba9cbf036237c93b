"""Anonymisation rules: TOML layers (read with tomllib), checked at start-up, compiled into a Profile.

A profile is an ordered list of layers; a later layer's action for an element replaces an
earlier one's. Shipped layers live in rules/: the Basic Profile and one layer per option,
generated from DICOM PS3.15 Table E.1-1, and a site example.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import keyword_dict

from dumpwatch.errors import ConfigError


def _shipped_layers() -> Path:
    """The folder of the layers that ship with dumpwatch: the package data dumpwatch.layers,
    which is rules/ of the checkout in an editable install and its copy in an installed
    wheel; rules/ beside the package when dumpwatch runs from a checkout not installed."""
    try:
        return Path(str(importlib.resources.files("dumpwatch.layers")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "rules"


RULES_DIR = _shipped_layers()

ACTIONS = {"D", "Z", "X", "K", "C", "U", "X/Z", "Z/D", "X/D", "X/Z/D", "X/Z/U*"}

# A combined code leaves the choice to the attribute's Type in the object's IOD. dumpwatch
# does not consult IOD tables, so it takes the choice that is valid whatever the Type:
# a dummy where D is allowed (a Type 1 attribute needs a value), empty for X/Z (a Type 2
# attribute must stay), and for X/Z/U* it keeps the reference sequence, whose UIDs inside
# are replaced by their own U rules ("R").
RESOLVED = {"X/Z": "Z", "Z/D": "D", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "R"}
PROTECTIVE = {"X", "Z", "D", "U", "R"}  # actions that keep no original value

_TAG = re.compile(r"\(?\s*([0-9A-Fa-fXx]{4})\s*,\s*([0-9A-Fa-fXx]{4})\s*\)?")
_PRIVATE_TAG = re.compile(r"\(?\s*([0-9A-Fa-f]{4})\s*,\s*[Xx]{2}([0-9A-Fa-f]{2})\s*\)?")
_Fail = Callable[[str, str], ConfigError]  # (message, key) -> the error naming the layer's file and line


@dataclass(frozen=True)
class Layer:
    name: str
    title: str
    code: str | None  # the CID 7050 code of a standard profile or option
    path: Path
    actions: dict[int, str]  # exact tags
    masks: tuple[tuple[int, int, str], ...]  # (mask, value, action) for tags such as (50xx,xxxx)
    private_default: str | None
    private: dict[tuple[str, int, int], str]  # (creator, group, offset) -> action
    edition: str | None = None


@dataclass(frozen=True)
class Profile:
    """The layers of anon_profile, compiled: one action per element, the last layer's."""

    layers: tuple[Layer, ...]
    actions: dict[int, str] = field(default_factory=dict)
    masks: tuple[tuple[int, int, str], ...] = ()
    private_default: str = "X"
    private: dict[tuple[str, int, int], str] = field(default_factory=dict)
    applied: tuple[tuple[str, str], ...] = ()  # (code, title) of the standard profile and options fully applied

    def action(self, tag: int) -> str | None:
        """The resolved action for a public element, or None to keep it."""
        found = self.actions.get(tag)
        if found is None:
            for mask, value, action in self.masks:
                if tag & mask == value:
                    found = action
                    break
        return RESOLVED.get(found, found) if found else None

    def private_action(self, creator: str | None, group: int, offset: int) -> str:
        action = self.private.get(((creator or "").strip().upper(), group, offset), self.private_default)
        return RESOLVED.get(action, action)

    @property
    def description(self) -> str:
        return ", ".join(layer.name for layer in self.layers)


def _line_of(text: str, key: str) -> int | None:
    """The line a key is written on (tomllib does not say)."""
    bare = key.strip('"')
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith((bare, f'"{bare}"', f"'{bare}'", f"[{bare}]", f"[{bare}.")):
            return number
    return None


def parse_tag(text: str) -> tuple[int, int] | None:
    """(mask, value) for "(gggg,eeee)", where x in a digit matches any digit; None if not a tag."""
    match = _TAG.fullmatch(text.strip())
    if not match:
        return None
    digits = (match[1] + match[2]).upper()
    mask = value = 0
    for digit in digits:
        mask <<= 4
        value <<= 4
        if digit != "X":
            mask |= 0xF
            value |= int(digit, 16)
    return mask, value


def load_layer(path: Path) -> Layer:
    """Read and check one layer file. ConfigError names the file, the line and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _lineno_from_message(str(exc))
        raise ConfigError(f"not valid TOML: {exc}", path, line) from None

    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(message, path, _line_of(text, key), key)

    for table in data:
        if table not in ("layer", "actions", "private"):
            raise fail("unknown table (a layer has [layer], [actions] and [private])", table)
    meta = data.get("layer", {})
    for key in meta:
        if key not in ("name", "title", "code", "edition"):
            raise fail("unknown key in [layer]", key)
    actions, masks = _public_actions(data.get("actions", {}), fail)
    private_default, private = _private_actions(data.get("private", {}), fail)
    name = str(meta.get("name", path.stem))
    return Layer(name, str(meta.get("title", name)), meta.get("code"), path, actions, tuple(masks),
                 private_default, private, meta.get("edition"))


def _public_actions(table: dict, fail: _Fail) -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """A layer's [actions]: (action by exact tag, (mask, value, action) for tags such as (50xx,xxxx))."""
    actions: dict[int, str] = {}
    masks: list[tuple[int, int, str]] = []
    for key, action in table.items():
        if action not in ACTIONS:
            raise fail(f"unknown action {action!r} (one of {', '.join(sorted(ACTIONS))})", key)
        if key in keyword_dict:
            actions[keyword_dict[key]] = action
            continue
        parsed = parse_tag(key)
        if parsed is None:
            raise fail("neither a DICOM keyword nor a tag such as (0010,0010)", key)
        mask, value = parsed
        if (value >> 16) % 2 and mask & 0x10000:
            raise fail("a private element: name it in a [private.\"CREATOR\"] table", key)
        if mask == 0xFFFFFFFF:
            actions[value] = action
        else:
            masks.append((mask, value, action))
    return actions, masks


def _private_actions(table: dict, fail: _Fail) -> tuple[str | None, dict[tuple[str, int, int], str]]:
    """A layer's [private]: (its default, or None; action by (creator, group, offset))."""
    private_default = None
    private: dict[tuple[str, int, int], str] = {}
    for key, value in table.items():
        if key == "default":
            if value not in ("X", "K", "C"):
                raise fail("the private default is X (remove), K (keep) or C (keep only those named)", key)
            private_default = value
            continue
        if not isinstance(value, dict):
            raise fail('expected default = "X" or a [private."CREATOR"] table', key)
        creator = key.strip().upper()
        if not creator:
            raise fail("empty private creator", key)
        for tag_key, action in value.items():
            match = _PRIVATE_TAG.fullmatch(tag_key.strip())
            if not match or int(match[1], 16) % 2 == 0:
                raise fail("a private element is (gggg,xxee) with gggg odd, e.g. (0019,xx0C)", tag_key)
            if action not in ACTIONS:
                raise fail(f"unknown action {action!r}", tag_key)
            private[(creator, int(match[1], 16), int(match[2], 16))] = action
    return private_default, private


def _lineno_from_message(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match[1]) if match else None


def legacy_layer(tags: tuple[int, ...], path: Path | None) -> Layer:
    """DcmServer's anon_fields: empty each listed element."""
    return Layer("anon_fields", "anon_fields (DcmServer)", None, path or Path("anon_fields"),
                 dict.fromkeys(tags, "Z"), (), None, {})


def find_layer(name: str, rules_dir: Path, base: Path) -> Path:
    """A layer by name (rules_dir/NAME.toml) or by path (relative to the configuration file)."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        return path if path.is_absolute() else base / path
    return rules_dir / f"{name}.toml"


def compile_profile(layers: list[Layer]) -> Profile:
    """Merge layers, later over earlier, and work out which standard options are fully applied."""
    actions: dict[int, str] = {}
    setter: dict[int, Layer] = {}
    masks: list[tuple[int, int, str]] = []
    private_default, default_setter = "X", None
    private: dict[tuple[str, int, int], str] = {}
    for layer in layers:
        for tag, action in layer.actions.items():
            actions[tag] = action
            setter[tag] = layer
        masks = [(m, v, a) for m, v, a in masks if (m, v) not in {(m2, v2) for m2, v2, _ in layer.masks}]
        masks = list(layer.masks) + masks  # later layers first
        if layer.private_default is not None:
            private_default, default_setter = layer.private_default, layer
        private.update(layer.private)
    profile = Profile(tuple(layers), actions, tuple(masks), private_default, private)
    return Profile(profile.layers, actions, tuple(masks), private_default, private,
                   _applied(profile, setter, default_setter))


def _applied(profile: Profile, setter: dict[int, Layer], default_setter: Layer | None) -> tuple[tuple[str, str], ...]:
    """The standard profile and options whose every rule is in effect (for the audit)."""
    def effective(layer: Layer) -> bool:
        return (all(profile.actions.get(tag) == action for tag, action in layer.actions.items())
                and all(mask in profile.masks for mask in layer.masks)
                and (layer.private_default is None or profile.private_default == layer.private_default))

    options = [layer for layer in profile.layers if layer.code and layer.code != "113100" and effective(layer)]
    option_names = {layer.name for layer in options}
    applied = [(layer.code, layer.title) for layer in options]
    basic = next((layer for layer in profile.layers if layer.code == "113100"), None)
    if basic is not None:
        # Every element of the Basic Profile is treated as it says, or more strictly, or as a
        # fully applied option allows.
        ok = True
        for tag, action in basic.actions.items():
            final = profile.actions[tag]  # basic is one of the layers merged: each of its tags has one
            resolved = RESOLVED.get(final, final)
            if final == action or resolved in PROTECTIVE or any(o.actions.get(tag) == final for o in options):
                continue
            ok = False
            break
        private_ok = profile.private_default == "X" or (
            default_setter is not None and default_setter.name in option_names)
        kept_private = [a for a in profile.private.values() if RESOLVED.get(a, a) not in PROTECTIVE]
        if kept_private and "retain-safe-private" not in option_names:
            private_ok = False
        if ok and private_ok:
            applied.insert(0, (basic.code, basic.title))
    return tuple((code, title) for code, title in applied if code)


def load_profile(names: list[str], rules_dir: Path, base: Path, legacy: tuple[int, ...] = (),
                 legacy_path: Path | None = None) -> Profile:
    layers = [load_layer(find_layer(name, rules_dir, base)) for name in names]
    if legacy:
        layers.append(legacy_layer(legacy, legacy_path))
    return compile_profile(layers)
