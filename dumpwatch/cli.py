"""The `dumpwatch` command: thin click commands over the package's functions."""

from __future__ import annotations

from dataclasses import dataclass

import click

from dumpwatch import __version__
from dumpwatch.config import Config, load_config
from dumpwatch.errors import ConfigError


@dataclass
class Options:
    config: str | None
    verbose: int


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


@cli.command("check-config")
@click.pass_obj
def check_config(options: Options) -> None:
    """Check the configuration file and print the configuration in effect."""
    cfg = _config(options)
    click.echo(f"# {cfg.path if cfg.path else 'no configuration file: defaults only'}")
    for key, value, origin in cfg.effective():
        click.echo(f"{key:<20}= {value:<50} # {origin}".rstrip())
    for key in cfg.unused:
        from dumpwatch.config import LEGACY_UNUSED

        click.echo(f"note: '{key}' (from DcmServer) is not used: {LEGACY_UNUSED[key]}")
    for note in cfg.layout_warnings():
        click.echo(f"note: {note}")


def main() -> None:
    cli(prog_name="dumpwatch")
