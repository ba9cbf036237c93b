"""The `dumpwatch` command: thin click commands over the package's functions."""

from __future__ import annotations

import faulthandler
import json
import logging
import logging.handlers
import os
import signal
import sqlite3
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import click

from dumpwatch import __version__
from dumpwatch.config import KEYS, LEGACY_UNUSED, Config, check_layout, load_config
from dumpwatch.dumplock import AlreadyServing, read_lock
from dumpwatch.errors import ConfigError, ServeFailed
from dumpwatch.journal import Journal, printable
from dumpwatch.keys import load_key
from dumpwatch.pipeline import Outcome
from dumpwatch.rules import RULES_DIR, load_layer
from dumpwatch.send import Receiver, Result, SendError, check_receiver, list_folder, send
from dumpwatch.sortonce import EXIT_ERROR, inside, sort_dir
from dumpwatch.status import render, report
from dumpwatch.watcher import Server
from dumpwatch.workers import quiet_pydicom

log = logging.getLogger("dumpwatch")
STOP_REPORT = 20  # seconds: a stop taking longer writes where serve waits (supervisord's stopwaitsecs is 30)


@dataclass
class Options:
    config: str | None
    verbose: int


def setup_logging(cfg: Config, verbose: int, stderr_level: int = logging.ERROR, per_file: bool = True) -> None:
    """INFO and up to the log file (if fname_log is set); to stderr, stderr_level unless -v,
    and records about one file's outcome (pipeline.PER_FILE) only if per_file or -v."""
    quiet_pydicom()
    root = logging.getLogger("dumpwatch")
    for handler in [h for h in root.handlers if getattr(h, "dumpwatch", False)]:
        root.removeHandler(handler)  # set up again (a second command in one process)
        handler.close()
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    form = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(stderr_level if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    stderr.setFormatter(form)
    if not per_file and not verbose:
        stderr.addFilter(lambda record: not getattr(record, "per_file", False))
    stderr.dumpwatch = True  # type: ignore[attr-defined]
    root.addHandler(stderr)
    if cfg.fname_log is not None:
        cfg.fname_log.parent.mkdir(parents=True, exist_ok=True)
        # Reopens the file after logrotate moves it; odd bytes in file names become \xNN.
        handler = logging.handlers.WatchedFileHandler(cfg.fname_log, errors="backslashreplace")
        handler.setLevel(logging.INFO)
        handler.setFormatter(form)
        handler.dumpwatch = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def _log_stream():
    """The log file's stream if there is one, else stderr."""
    for handler in logging.getLogger("dumpwatch").handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler) and handler.stream is not None:
            return handler.stream
    return sys.stderr


def reopen_log() -> None:
    """SIGHUP, as daemons take it: open the log file anew (logrotate's postrotate, or a log
    moved by hand). If it cannot be opened, the old one is kept: a signal never stops serve."""
    files = [h for h in logging.getLogger("dumpwatch").handlers
             if isinstance(h, logging.handlers.WatchedFileHandler) and getattr(h, "dumpwatch", False)]
    for handler in files:
        try:
            stream = handler._open()  # the handler's own opener: its mode, encoding and errors
        except OSError as exc:
            log.error("SIGHUP: cannot reopen the log file %s: %s; writing on to the old one",
                      handler.baseFilename, exc.strerror)
            continue
        old = handler.setStream(stream)
        handler._statstream()  # the file it now writes to, for its own check after logrotate
        if old is not None:
            old.close()
    if files:
        log.info("SIGHUP: reopened the log file %s", ", ".join(h.baseFilename for h in files))
    else:
        log.info("SIGHUP: no log file to reopen (fname_log is not set); going on")


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_object(Options).config = value


def config_option(command):
    """--config after the command's name too (`dumpwatch status --config FILE`), meaning what
    it means before it; given both ways, the later one counts."""
    return click.option("--config", metavar="FILE", expose_value=False, callback=_remember_config,
                        help="Configuration file (else $DUMPWATCH_CONFIG, else ./dumpwatch.cfg).")(command)


def _config(options: Options) -> Config:
    try:
        return load_config(options.config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help="Configuration file (else $DUMPWATCH_CONFIG, else ./dumpwatch.cfg).")
@click.option("-v", "--verbose", count=True, help="Say more on stderr (-vv for debugging).")
@click.version_option(__version__, prog_name="dumpwatch")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """Sort DICOM files that storescp received into <dir_out>/<study>/<series>/<instance>.dcm."""
    ctx.obj = Options(config_path, verbose)


@cli.command("sort-once")
@config_option
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Sorted tree (overrides dir_out).")
@click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path),
              help="Quarantine folder (overrides dir_quarantine).")
@click.option("--copy", is_flag=True, help="Copy files, leaving the sources in place (for archives).")
@click.option("--dry-run", is_flag=True, help="Print what would happen; change nothing.")
@click.pass_obj
def sort_once(options: Options, folder: Path, out: Path | None, quarantine: Path | None,
              copy: bool, dry_run: bool) -> None:
    """Sort every file below FOLDER (an old dump, an archive), then exit.

    Symlinks are never followed. Exit status: 0 when every file was sorted or was an
    identical duplicate, 3 when some were quarantined or left, 1 on errors, 2 on bad usage.

    \b
    Example:
        dumpwatch sort-once /srv/dicom/old-dump --out /srv/dicom/sorted
    """
    cfg = _config(options)
    folder = Path(os.path.abspath(folder))
    changes: dict[str, object] = {}
    if out is not None:
        changes["dir_out"] = Path(os.path.abspath(out))
    if quarantine is not None:
        changes["dir_quarantine"] = Path(os.path.abspath(quarantine))
    if cfg.dir_dump is None and cfg.dir_quarantine is None and quarantine is None:
        changes["dir_quarantine"] = folder.parent / "quarantine"
    cfg = cfg.replace(**changes)
    if cfg.dir_out is None:
        raise click.UsageError("no sorted tree: give --out DIR or set dir_out in the configuration")
    out_dir = Path(os.path.abspath(cfg.dir_out))
    if folder == out_dir or out_dir in folder.parents or inside(folder, out_dir):
        raise click.UsageError(f"{folder} is inside the sorted tree {out_dir}; sort from outside it")
    holder = read_lock(folder)
    if holder is not None:
        raise click.UsageError(f"dumpwatch serve is watching {folder} ({holder.describe()}) and sorts it itself; "
                               "sort-once is for folders no one else is writing to")
    try:
        check_layout(cfg)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(cfg, options.verbose, per_file=False)  # the summary counts them by reason

    bar = None
    show_bar = sys.stderr.isatty() and not dry_run

    def start(total: int) -> None:
        nonlocal bar
        if show_bar and total:
            bar = click.progressbar(length=total, label="Sorting", file=sys.stderr, show_pos=True)
            bar.__enter__()

    def advance(count: int) -> None:
        if bar is not None:
            bar.update(count)

    def explain(outcome: Outcome) -> None:
        source = printable(os.path.relpath(outcome.source, folder))
        if outcome.outcome in ("sorted", "duplicate"):
            target = os.path.relpath(outcome.detail, out_dir)
            arrow = "->" if outcome.outcome == "sorted" else "=="
            click.echo(f"{outcome.outcome:<11} {source} {arrow} {target}")
        else:
            click.echo(f"{outcome.outcome:<11} {source}: {printable(outcome.detail)}")

    try:
        summary = sort_dir(folder, cfg, copy=copy, dry_run=dry_run, count_first=start, progress=advance,
                           on_outcome=explain if dry_run else None)
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"the journal {cfg.journal_path} cannot be used: {exc}") from None
    except ConfigError as exc:  # the anonymisation key: unreadable, or readable by others
        raise click.ClickException(str(exc)) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(summary.render(cfg, dry_run))
    sys.exit(summary.exit_code)  # 0 all sorted, 3 some not, 1 error, 130 interrupted


@cli.command("serve")
@config_option
@click.pass_obj
def serve_command(options: Options) -> None:
    """Watch dir_dump and sort each file storescp finishes, until SIGTERM or Ctrl-C.

    Run it beside storescp under a supervisor (supervisord, systemd): it exits non-zero
    if it cannot go on (its folder watcher or a worker died), so that it is restarted.
    Files already in the dump are sorted at start; a sweep every sweep_interval seconds
    catches anything an event missed. A second serve on the same dump refuses to start.
    """
    cfg = _config(options)
    if cfg.dir_dump is None or cfg.dir_out is None:
        raise click.ClickException("serve needs dir_dump and dir_out in the configuration")
    # Without a log file, stderr is the log: supervisord and journald keep it.
    setup_logging(cfg, options.verbose, logging.WARNING if cfg.fname_log else logging.INFO)
    stop = threading.Event()

    def on_stop(*_: object) -> None:
        stop.set()
        # A stop takes a moment (the files in hand are finished). Should it take far longer,
        # where each thread waits goes to the log, for whoever must find out why.
        faulthandler.dump_traceback_later(STOP_REPORT, exit=False, file=_log_stream())

    # From the first moment: a stop during start-up (recovery may take a while) then ends
    # serve cleanly, as soon as it is ready, instead of killing it half-way.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_stop)
    # SIGHUP (whose default is to end the process) asks for the log to be reopened. The
    # handler only passes that on: the loop does it on its own thread, never mid-write.
    # The workers, forked later, inherit it: a SIGHUP to the process group spares them too.
    server: Server | None = None
    hangups: list[int] = []

    def hangup(*_: object) -> None:
        if server is None:
            hangups.append(1)  # still starting: once the loop runs
        else:
            server.call_soon(reopen_log)

    signal.signal(signal.SIGHUP, hangup)
    try:
        server = Server(cfg)  # forks the workers: before any thread starts
    except AlreadyServing as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot start: the journal {cfg.journal_path} cannot be used: {exc} (move it "
                                   "aside to keep it: serve then starts a new one, and rebuilds what it can from "
                                   "the tree)") from None
    except (OSError, ConfigError) as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    if hangups:
        server.call_soon(reopen_log)
    try:
        server.run(stop)
    except (ServeFailed, OSError) as exc:
        log.error("stopping: %s", exc)
        sys.exit(EXIT_ERROR)
    except sqlite3.Error as exc:
        log.error("stopping: the journal %s cannot be written: %s", cfg.journal_path, exc)
        sys.exit(EXIT_ERROR)
    finally:
        server.close()
    log.info("stopped")


@cli.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, for monitoring.")
@click.pass_obj
def status_command(options: Options, as_json: bool) -> None:
    """Is all well? storescp listening, the watcher alive, the dump's backlog, recent
    sorting, the quarantine. Exit status 0 when healthy, 1 when not (for monitoring)."""
    cfg = _config(options)
    data = report(cfg)
    click.echo(json.dumps(data, indent=2) if as_json else render(data))
    sys.exit(0 if data["healthy"] else EXIT_ERROR)


@cli.command("config-value")
@config_option
@click.argument("keys", nargs=-1, required=True)
@click.pass_obj
def config_value(options: Options, keys: tuple[str, ...]) -> None:
    """Print configuration values, one a line (for scripts/storescp.sh).

    \b
    Example:
        dumpwatch --config /etc/dumpwatch.cfg config-value port aetitle dir_dump
    """
    cfg = _config(options)
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


@cli.command("check-rules")
@config_option
@click.pass_obj
def check_rules(options: Options) -> None:
    """Check every rule layer in rules_dir and the configured anon_profile; print what the
    profile does. Exit status 1 on the first mistake, named by file, line and key."""
    cfg = _config(options)
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


@cli.command("check-config")
@config_option
@click.pass_obj
def check_config(options: Options) -> None:
    """Check the configuration file and print the configuration in effect."""
    cfg = _config(options)
    click.echo(f"# {cfg.path if cfg.path else 'no configuration file: defaults only'}")
    for key, value, origin in cfg.effective():
        click.echo(f"{key:<20}= {value:<50} # {origin}".rstrip())
    for key in cfg.unused:
        click.echo(f"note: '{key}' (from DcmServer) is not used: {LEGACY_UNUSED[key.lower()]}")
    for note in cfg.layout_warnings():
        click.echo(f"note: {note}")


@cli.command("where")
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
    cfg = _config(options)
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


@cli.command("send")
@config_option
@click.argument("folder", type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="The receiver's host name or address.")
@click.option("--port", type=click.IntRange(1, 65535), help="The receiver's port (else port in the configuration).")
@click.option("--aec", metavar="AET",
              help="The receiver's AE title, the called one (else AETitle in the configuration).")
@click.option("--aet", metavar="AET", default="DUMPWATCH_SEND", show_default=True,
              help="Our AE title, the calling one.")
@click.pass_obj
def send_command(options: Options, folder: Path, host: str, port: int | None, aec: str | None, aet: str) -> None:
    """Send every DICOM file below FOLDER to a DICOM receiver (with DCMTK's storescu).

    Each file is offered in its own SOP class and transfer syntax (compressed and private
    ones too), so that a receiver that takes them all, as dumpwatch's storescp does, is
    refused nothing. Files that are not DICOM are skipped and counted; symlinks are not
    followed. Exit status 0 when every DICOM file was stored, 1 when any was not.

    \b
    Example:
        dumpwatch send /media/cdrom --host 10.0.0.5 --port 11112 --aec MRI_SORT
    """
    if port is None or aec is None:
        cfg = _config(options)
        port = cfg.port if port is None else port
        aec = cfg.aetitle if aec is None else aec
    receiver = Receiver(host, port, aec, aet)
    try:
        check_receiver(receiver)
    except SendError as exc:
        raise click.UsageError(str(exc)) from None
    quiet_pydicom()  # odd but readable headers are sent as they are
    root = Path(os.path.abspath(folder))
    base = root if root.is_dir() else root.parent

    def shown(path: str) -> str:
        return printable(os.path.relpath(path, base))

    listing = list_folder(root)

    def say_skipped() -> None:
        for why, count in listing.skipped.items():
            click.echo(f"  skipped   {count:>6}  {why}, e.g. {shown(listing.examples[why])}")

    if not listing.items and not listing.unsendable:
        say_skipped()
        raise click.ClickException(f"no DICOM file below {printable(str(root))}: nothing sent")
    for path, why in listing.unsendable:
        click.echo(f"not sent  {shown(path)}: {why}")
    association: dict[str, int] = {}  # why a whole run failed -> files: said once, not per file

    def report(result: Result) -> None:
        if result.sent:
            if options.verbose:
                click.echo(f"sent      {shown(result.item.path)}" + (f" ({result.warning})" if result.warning else ""))
        elif result.reason.startswith("storescu could not send to "):
            association[result.reason] = association.get(result.reason, 0) + 1
        else:
            click.echo(f"not sent  {shown(result.item.path)}: {result.reason}")

    try:
        outcome = send(listing.items, receiver, report)
    except SendError as exc:
        raise click.ClickException(str(exc)) from None
    runs = f"{outcome.runs} association{'s' if outcome.runs != 1 else ''}"
    click.echo(f"{len(outcome.delivered)} of {len(listing.items) + len(listing.unsendable)} DICOM files sent to "
               f"{receiver} in {outcome.elapsed:.1f} s ({runs})")
    for why, count in association.items():
        click.echo(f"  not sent  {count:>6}  {why}")
    refused = len(outcome.failed) - sum(association.values())
    if refused:
        click.echo(f"  not sent  {refused:>6}  refused by the receiver or by storescu (each named above)")
    if listing.unsendable:
        click.echo(f"  not sent  {len(listing.unsendable):>6}  could not be read or cannot be sent (each named above)")
    say_skipped()
    sys.exit(0 if not outcome.failed and not listing.unsendable else EXIT_ERROR)


def main() -> None:
    cli(prog_name="dumpwatch")
