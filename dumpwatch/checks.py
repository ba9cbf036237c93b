"""The commands that only look: status, report, config-value, check-rules, check-config, where."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import click

from dumpwatch.configkeys import KEYS, LEGACY_UNUSED
from dumpwatch.errors import ConfigError
from dumpwatch.journal import Journal
from dumpwatch.keys import load_key
from dumpwatch.options import Options, config_from, config_option
from dumpwatch.report import ReportError, gather, open_journal, parse_since
from dumpwatch.report import render as render_report
from dumpwatch.rules import RULES_DIR, load_layer
from dumpwatch.sortonce import EXIT_ERROR
from dumpwatch.status import exit_code, render, report


@click.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, for monitoring.")
@click.pass_obj
def status_command(options: Options, as_json: bool) -> None:
    """Is all well? storescp listening, the watcher alive, the dump's backlog, recent
    sorting, the quarantine, disk space. Exit status 0 when healthy, 1 when not, 3 when
    healthy with a warning (a filesystem past disk_warn, or filling within a day)."""
    cfg = config_from(options)
    data = report(cfg)
    click.echo(json.dumps(data, indent=2) if as_json else render(data))
    sys.exit(exit_code(data))


@click.command("config-value")
@config_option
@click.argument("keys", nargs=-1, required=True)
@click.pass_obj
def config_value(options: Options, keys: tuple[str, ...]) -> None:
    """Print configuration values, one a line (for scripts/storescp.sh).

    \b
    Example:
        dumpwatch --config /etc/dumpwatch.cfg config-value port aetitle dir_dump
    """
    cfg = config_from(options)
    for key in keys:
        name = key.lower()
        if name not in KEYS:
            raise click.UsageError(f"no such key: {key}")
        value = {"dir_quarantine": cfg.quarantine_dir, "journal": cfg.journal_path}.get(name, getattr(cfg, name))
        if value is None:
            raise click.ClickException(f"{key} is not set in {cfg.path or 'the configuration'}")
        text = str(value)
        if "\n" in text:
            raise click.ClickException(f"{key} holds a line break")
        click.echo(text)


@click.command("check-rules")
@config_option
@click.pass_obj
def check_rules(options: Options) -> None:
    """Check every rule layer in rules_dir and the configured anon_profile; print what the
    profile does. Exit status 1 on the first mistake, named by file, line and key."""
    cfg = config_from(options)
    rules_dir = cfg.rules_dir or RULES_DIR
    try:
        layers = [load_layer(path) for path in sorted(rules_dir.glob("*.toml"))]
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for layer in layers:
        private = len(layer.private) + (layer.private_default is not None)
        click.echo(f"ok  {layer.path.name:<32} {len(layer.actions) + len(layer.masks):>4} rules"
                   f"{f', {private} private' if private else ''}  {layer.title}")
    profile = cfg.profile
    if profile is None:
        click.echo("anon_profile is not set: no anonymisation" + (" (anon_fields empties "
                   f"{len(cfg.anon_fields)} elements)" if cfg.anon_fields else ""))
        return
    click.echo(f"anon_profile = {profile.description}: {len(profile.actions) + len(profile.masks)} element rules, "
               f"private elements: {profile.private_default}, {len(profile.private)} by creator")
    for code, title in profile.applied:
        click.echo(f"  fully applied: {code} {title}")
    if not any(code == "113100" for code, _ in profile.applied):
        click.echo("  note: the Basic Profile is not fully applied (a layer keeps what it removes)")


@click.command("check-config")
@config_option
@click.pass_obj
def check_config(options: Options) -> None:
    """Check the configuration file and print the configuration in effect."""
    cfg = config_from(options)
    click.echo(f"# {cfg.path if cfg.path else 'no configuration file: defaults only'}")
    for key, value, origin in cfg.effective():
        click.echo(f"{key:<20}= {value:<50} # {origin}".rstrip())
    for key in cfg.unused:
        click.echo(f"note: '{key}' (from DcmServer) is not used: {LEGACY_UNUSED[key.lower()]}")
    for note in cfg.layout_warnings():
        click.echo(f"note: {note}")


@click.command("where")
@config_option
@click.argument("term")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Sorted tree (overrides dir_out).")
@click.pass_obj
def where(options: Options, term: str, out: Path | None) -> None:
    """What happened to a file: TERM is its name in the dump, its SOPInstanceUID, its
    sha256 or its path in the sorted tree. Exit status 1 when the journal has no trace of it.

    \b
    Example:
        dumpwatch where MR.1.3.12.2.1107.5.2.43.67093.30000021071512345678900000001
    """
    cfg = config_from(options)
    if out is not None:
        cfg = cfg.replace(dir_out=Path(os.path.abspath(out)))
    path = cfg.journal_path
    if path is None or not path.exists():
        raise click.ClickException(f"no journal at {path}" if path else "no journal: set dir_out or journal")
    key = None
    if cfg.profile is not None and cfg.anon_key_path is not None and cfg.anon_key_path.exists():
        try:
            key = load_key(cfg.anon_key_path)  # the journal names files by keyed tokens
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        journal = Journal(path, key=key)
        try:
            rows = journal.find(term, tree=cfg.dir_out)
        finally:
            journal.close()
    except sqlite3.Error as exc:  # damaged: one line, as for any expected error
        raise click.ClickException(f"the journal {path} cannot be read: {exc}") from None
    except OSError as exc:
        raise click.ClickException(f"the journal {path} cannot be read: {exc.strerror or exc}") from None
    if not rows:
        click.echo(f"no trace of {term} in {path}")
        sys.exit(EXIT_ERROR)
    for row in rows:
        state = "" if row["done"] else " (under way)"
        target = row["dest"] or ""
        why = f"  ({row['reason']})" if row["reason"] else ""
        click.echo(f"{row['time']}  {row['outcome']}{state}  {row['source'] or ''}"
                   + (f" -> {target}" if target else "") + why)


@click.command("report")
@config_option
@click.option("--since", metavar="DATE", help="Only studies with a file since DATE (2026-12-01, '2026-12-01 14:00', "
              "or an age: 2d, 12h).")
@click.option("--subject", metavar="TEXT", help="Only studies whose folder holds TEXT (any case).")
@click.option("--incomplete", is_flag=True, help="Only series that miss images or are not complete yet.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (its shape is in the README).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Sorted tree (overrides dir_out).")
@click.pass_obj
def report_command(options: Options, since: str | None, subject: str | None, incomplete: bool, as_json: bool,
                   out: Path | None) -> None:
    """Did the whole scan arrive? Studies and their series: files, instance numbers, gaps,
    whether each is whole, and its state (receiving, complete, reopened). Exit status 0.

    \b
    Example:
        dumpwatch report --since 2d --incomplete
    """
    cfg = config_from(options)
    if out is not None:
        cfg = cfg.replace(dir_out=Path(os.path.abspath(out)))
    try:
        start = None if since is None else parse_since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    try:
        db = open_journal(cfg.journal_path)
        try:
            studies = gather(db, start, subject, incomplete)
        finally:
            db.close()
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"the journal {cfg.journal_path} cannot be read: {exc}") from None
    if as_json:
        click.echo(json.dumps({"journal": str(cfg.journal_path), "studies": studies}, indent=2))
    else:
        click.echo(render_report(studies), nl=False)
