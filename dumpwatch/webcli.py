"""The operators' view's commands: `web` (the status page and /metrics), `web-password`
(the logins it asks for) and `metrics` (the same metrics, once, for node_exporter's textfile
collector)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from dumpwatch.errors import ConfigError
from dumpwatch.options import Options, config_from, config_option
from dumpwatch.webauth import check_user, set_password

log = logging.getLogger("dumpwatch")


@click.command("web")
@config_option
@click.pass_obj
def web_command(options: Options) -> None:
    """Serve the status page and /metrics on web_bind:web_port, read-only, until SIGTERM.

    It shows what `status` and `report` show: health, today's and recent studies with
    each series' files, gaps and verdict, the quarantine by reason, disk space. It listens
    on 127.0.0.1 unless web_bind says otherwise; beyond loopback only with web_passwords.
    """
    from dumpwatch.cli import setup_logging  # (cli imports this module)
    from dumpwatch.web import serve_web

    cfg = config_from(options)
    setup_logging(cfg, options.verbose, logging.WARNING if cfg.fname_log else logging.INFO, per_file=False)
    try:
        server = serve_web(cfg)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {cfg.web_bind} port {cfg.web_port}: {exc.strerror or exc} "
                                   "(set web_port to a free port)") from None

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    log.info("web: stopped")


@click.command("web-password")
@config_option
@click.argument("user")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path),
              help="The password file (else web_passwords of the configuration).")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--remove", is_flag=True, help="Remove the user instead.")
@click.pass_obj
def web_password(options: Options, user: str, path: Path | None, from_stdin: bool, remove: bool) -> None:
    """Add USER to the web page's password file, or give them a new password (scrypt-hashed).

    \b
    Example:
        dumpwatch --config /etc/dumpwatch/dumpwatch.cfg web-password ra-team
    The running `dumpwatch web` reads the file again when it changes.
    """
    if path is None:
        path = config_from(options).web_passwords
        if path is None:
            raise click.UsageError("set web_passwords in the configuration, or give --file")
    try:
        check_user(user)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="USER") from None
    password = None
    if not remove:
        if from_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt(f"Password for {user}", hide_input=True, confirmation_prompt=True)
        if len(password) < 8:
            raise click.ClickException("a password has 8 characters at least")
    try:
        existed = set_password(path, user, password)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None
    if remove:
        click.echo(f"{user} removed from {path}" if existed else f"{user} was not in {path}")
    else:
        click.echo(f"{'new password for' if existed else 'added'} {user} in {path}")


@click.command("metrics")
@config_option
@click.option("--textfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Write them to this file (atomically), for node_exporter's textfile collector.")
@click.pass_obj
def metrics_command(options: Options, textfile: Path | None) -> None:
    """Print the Prometheus metrics /metrics serves (the same values as `status --json`)."""
    from dumpwatch import metrics
    from dumpwatch.status import report

    cfg = config_from(options)
    data = report(cfg)
    if textfile is None:
        click.echo(metrics.exposition(data).decode(), nl=False)
        return
    try:
        metrics.write_textfile(data, textfile)
    except OSError as exc:
        raise click.ClickException(f"cannot write {textfile}: {exc.strerror or exc}") from None
