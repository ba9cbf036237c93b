"""What every command shares: the group's Options, --config after a command's name too, and
the Config that --config names."""

from __future__ import annotations

from dataclasses import dataclass

import click

from dumpwatch.config import Config, load_config
from dumpwatch.errors import ConfigError


@dataclass
class Options:
    """What the group's own options say, for the command that runs: --config FILE and -v's count."""

    config: str | None
    verbose: int


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        options = ctx.find_object(Options)
        assert options is not None  # the group's callback made it, before a command's options are read
        options.config = value


def config_option(command):
    """--config after the command's name too (`dumpwatch status --config FILE`), meaning what
    it means before it; given both ways, the later one counts."""
    return click.option("--config", metavar="FILE", expose_value=False, callback=_remember_config,
                        help="Configuration file (else $DUMPWATCH_CONFIG, else ./dumpwatch.cfg).")(command)


def config_from(options: Options) -> Config:
    """The configuration that --config names; a ClickException (one line, exit 1) if it is wrong."""
    try:
        return load_config(options.config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
