"""The `dumpwatch` command: the click group, and the commands that move files (sort-once,
serve, send). The commands that only look are in checks.py."""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from dumpwatch import __version__
from dumpwatch.checks import check_config, check_rules, config_value, report_command, status_command, where
from dumpwatch.config import Config, check_layout
from dumpwatch.dumplock import AlreadyServing, read_lock
from dumpwatch.errors import ConfigError, ServeFailed
from dumpwatch.options import Options, config_from, config_option
from dumpwatch.outcomes import Handled, Outcome
from dumpwatch.send import Listing, Receiver, Result, SendError, Sent, check_receiver, list_folder, send
from dumpwatch.sortonce import EXIT_ERROR, inside, sort_dir
from dumpwatch.text import printable
from dumpwatch.watcher import Server
from dumpwatch.webcli import metrics_command, web_command, web_password
from dumpwatch.workers import quiet_pydicom

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

log = logging.getLogger("dumpwatch")
STOP_REPORT = 20  # seconds: a stop taking longer writes where serve waits (supervisord's stopwaitsecs is 30)


def setup_logging(cfg: Config, verbose: int, stderr_level: int = logging.ERROR, per_file: bool = True) -> None:
    """INFO and up to the log file (if fname_log is set); to stderr, stderr_level unless -v,
    and records about one file's outcome (outcomes.PER_FILE) only if per_file or -v."""
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
    stderr.dumpwatch = True  # type: ignore[attr-defined]  # marks our handlers, for the next call to find
    root.addHandler(stderr)
    if cfg.fname_log is not None:
        cfg.fname_log.parent.mkdir(parents=True, exist_ok=True)
        # Reopens the file after logrotate moves it; odd bytes in file names become \xNN.
        handler = logging.handlers.WatchedFileHandler(cfg.fname_log, errors="backslashreplace")
        handler.setLevel(logging.INFO)
        handler.setFormatter(form)
        handler.dumpwatch = True  # type: ignore[attr-defined]  # as stderr's above
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help="Configuration file (else $DUMPWATCH_CONFIG, else ./dumpwatch.cfg).")
@click.option("-v", "--verbose", count=True, help="Say more on stderr (-vv for debugging).")
@click.version_option(__version__, prog_name="dumpwatch")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """Sort DICOM files that storescp received into <dir_out>/<study>/<series>/<instance>.dcm."""
    ctx.obj = Options(config_path, verbose)


cli.add_command(status_command)  # the commands that only look are in checks.py
cli.add_command(config_value)
cli.add_command(check_rules)
cli.add_command(check_config)
cli.add_command(where)
cli.add_command(report_command)
cli.add_command(web_command)  # the operators' view: webcli.py
cli.add_command(web_password)
cli.add_command(metrics_command)


@cli.command("sort-once")
@config_option
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Sorted tree (overrides dir_out).")
@click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path),
              help="Quarantine folder (overrides dir_quarantine).")
@click.option("--copy", is_flag=True, help="Copy files, leaving the sources in place (for archives).")
@click.option("--dry-run", is_flag=True, help="Print what would happen; change nothing.")
@click.option("--no-hooks", is_flag=True, help="Queue no hook runs for the series and studies it completes.")
@click.pass_obj
def sort_once(options: Options, folder: Path, out: Path | None, quarantine: Path | None,
              copy: bool, dry_run: bool, no_hooks: bool) -> None:
    """Sort every file below FOLDER (an old dump, an archive), then exit.

    Symlinks are never followed. Exit status: 0 when every file was sorted or was an
    identical duplicate, 3 when some were quarantined or left, 1 on errors, 2 on bad usage.

    \b
    Example:
        dumpwatch sort-once /srv/dicom/old-dump --out /srv/dicom/sorted
    """
    cfg = config_from(options)
    folder = Path(os.path.abspath(folder))
    cfg, out_dir = _sort_once_config(cfg, folder, out, quarantine)
    setup_logging(cfg, options.verbose, per_file=False)  # the summary counts them by reason
    bar = _Progress(sys.stderr.isatty() and not dry_run)
    explain = _explainer(folder, out_dir)
    try:
        summary = sort_dir(folder, cfg, copy=copy, dry_run=dry_run, count_first=bar.start, progress=bar.advance,
                           on_outcome=explain if dry_run else None, hooks=not no_hooks)
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"the journal {cfg.journal_path} cannot be used: {exc}") from None
    except ConfigError as exc:  # the anonymisation key: unreadable, or readable by others
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()
    click.echo(summary.render(cfg, dry_run))
    sys.exit(summary.exit_code)  # 0 all sorted, 3 some not, 1 error, 130 interrupted


def _sort_once_config(cfg: Config, folder: Path, out: Path | None, quarantine: Path | None) -> tuple[Config, Path]:
    """The configuration with sort-once's options, and its sorted tree; UsageError for a
    folder it must not sort."""
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
    return cfg, out_dir


class _Progress:
    """sort-once's progress bar on stderr, if shown at all: sort_dir counts the files first."""

    def __init__(self, show: bool):
        self.show = show
        self.bar: ProgressBar[int] | None = None

    def start(self, total: int) -> None:
        if self.show and total:
            self.bar = click.progressbar(length=total, label="Sorting", file=sys.stderr, show_pos=True)
            self.bar.__enter__()

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _explainer(folder: Path, out_dir: Path) -> Callable[[Handled], None]:
    """A dry run's line per file: what would happen to it."""

    def explain(outcome: Handled) -> None:
        source = printable(os.path.relpath(outcome.source, folder))
        if outcome.outcome in (Outcome.SORTED, Outcome.DUPLICATE):
            target = os.path.relpath(outcome.detail, out_dir)
            arrow = "->" if outcome.outcome == Outcome.SORTED else "=="
            click.echo(f"{outcome.outcome:<11} {source} {arrow} {target}")
        else:
            click.echo(f"{outcome.outcome:<11} {source}: {printable(outcome.detail)}")

    return explain


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
    cfg = config_from(options)
    if cfg.dir_dump is None or cfg.dir_out is None:
        raise click.ClickException("serve needs dir_dump and dir_out in the configuration")
    # Without a log file, stderr is the log: supervisord and journald keep it.
    setup_logging(cfg, options.verbose, logging.WARNING if cfg.fname_log else logging.INFO)
    signals = _Signals()
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
    signals.serving(server)
    try:
        server.run(signals.stop)
    except (ServeFailed, OSError) as exc:
        log.error("stopping: %s", exc)
        sys.exit(EXIT_ERROR)
    except sqlite3.Error as exc:
        log.error("stopping: the journal %s cannot be written: %s", cfg.journal_path, exc)
        sys.exit(EXIT_ERROR)
    finally:
        server.close()
    log.info("stopped")


class _Signals:
    """serve's signals, handled from the first moment: a stop during start-up (recovery may
    take a while) then ends serve cleanly, as soon as it is ready, instead of killing it
    half-way."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_stop)
        # SIGHUP (whose default is to end the process) asks for the log to be reopened. The
        # handler only passes that on: the loop does it on its own thread, never mid-write.
        # The workers, forked later, inherit it: a SIGHUP to the process group spares them too.
        self.server: Server | None = None
        self.hangups: list[int] = []
        signal.signal(signal.SIGHUP, self.hangup)

    def on_stop(self, *_: object) -> None:
        self.stop.set()
        # A stop takes a moment (the files in hand are finished). Should it take far longer,
        # where each thread waits goes to the log, for whoever must find out why.
        faulthandler.dump_traceback_later(STOP_REPORT, exit=False, file=_log_stream())

    def hangup(self, *_: object) -> None:
        if self.server is None:
            self.hangups.append(1)  # still starting: once the loop runs
        else:
            self.server.call_soon(reopen_log)

    def serving(self, server: Server) -> None:
        """The loop runs from now on: SIGHUP goes to it, and one that came while it started."""
        self.server = server
        if self.hangups:
            server.call_soon(reopen_log)


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
        cfg = config_from(options)
        port = cfg.port if port is None else port
        aec = cfg.aetitle if aec is None else aec
    receiver = Receiver(host, port, aec, aet)
    try:
        check_receiver(receiver)
    except SendError as exc:
        raise click.UsageError(str(exc)) from None
    quiet_pydicom()  # odd but readable headers are sent as they are
    root = Path(os.path.abspath(folder))
    said = _SendReport(root if root.is_dir() else root.parent, options.verbose)
    listing = list_folder(root)
    if not listing.items and not listing.unsendable:
        said.skipped(listing)
        raise click.ClickException(f"no DICOM file below {printable(str(root))}: nothing sent")
    for path, why in listing.unsendable:
        click.echo(f"not sent  {said.shown(path)}: {why}")
    try:
        outcome = send(listing.items, receiver, said.result)
    except SendError as exc:
        raise click.ClickException(str(exc)) from None
    said.summary(outcome, listing, receiver)
    sys.exit(0 if not outcome.failed and not listing.unsendable else EXIT_ERROR)


class _SendReport:
    """What send says: a line per file not sent (with -v, per file sent too), then the counts."""

    def __init__(self, base: Path, verbose: int):
        self.base = base
        self.verbose = verbose
        self.association: dict[str, int] = {}  # why a whole run failed -> files: said once, not per file

    def shown(self, path: str) -> str:
        return printable(os.path.relpath(path, self.base))

    def result(self, result: Result) -> None:
        if result.sent:
            if self.verbose:
                warning = f" ({result.warning})" if result.warning else ""
                click.echo(f"sent      {self.shown(result.item.path)}{warning}")
        elif result.reason.startswith("storescu could not send to "):
            self.association[result.reason] = self.association.get(result.reason, 0) + 1
        else:
            click.echo(f"not sent  {self.shown(result.item.path)}: {result.reason}")

    def skipped(self, listing: Listing) -> None:
        for why, count in listing.skipped.items():
            click.echo(f"  skipped   {count:>6}  {why}, e.g. {self.shown(listing.examples[why])}")

    def summary(self, outcome: Sent, listing: Listing, receiver: Receiver) -> None:
        runs = f"{outcome.runs} association{'s' if outcome.runs != 1 else ''}"
        click.echo(f"{len(outcome.delivered)} of {len(listing.items) + len(listing.unsendable)} DICOM files sent to "
                   f"{receiver} in {outcome.elapsed:.1f} s ({runs})")
        for why, count in self.association.items():
            click.echo(f"  not sent  {count:>6}  {why}")
        refused = len(outcome.failed) - sum(self.association.values())
        if refused:
            click.echo(f"  not sent  {refused:>6}  refused by the receiver or by storescu (each named above)")
        if listing.unsendable:
            click.echo(f"  not sent  {len(listing.unsendable):>6}  "
                       "could not be read or cannot be sent (each named above)")
        self.skipped(listing)


def main() -> None:
    cli(prog_name="dumpwatch")
