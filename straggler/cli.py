"""The `straggler` command line. Thin: each command parses, calls a library function, renders.

Commands live in ``straggler/commands/<name>.py`` and are imported only when run (or listed by
``--help``), so ``import straggler.cli`` loads neither torch, pandas, scipy nor pynvml.
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import EXIT_FAILED, StragglerError

# name -> (module, attribute, one-line help shown by `straggler --help`)
COMMANDS = {
    "scan": ("straggler.commands.scan", "scan", "Measure every device of this node (or a cluster) at once."),
    "analyze": ("straggler.commands.analyze", "analyze", "Find stragglers in result files."),
    "agent": ("straggler.commands.agent", "agent", "Run the per-node daemon (telemetry, idle probes, uploads)."),
    "collector": ("straggler.commands.collector", "collector", "Run the fleet collector service."),
    "gate": ("straggler.commands.gate", "gate", "Pre-job health gate: may this node run a job? (within a budget)"),
    "quarantine": (
        "straggler.commands.quarantine",
        "quarantine",
        "Drained nodes: list, drain, resume by hand; Slurm placement hints.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        # Short help without importing every command module.
        with formatter.section("Commands"):
            formatter.write_dl([(n, COMMANDS[n][2]) for n in sorted(COMMANDS)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="straggler")
def cli():
    """straggler: find the slow GPU before it slows every synchronous job it joins.

    Exit codes: 0 healthy, 1 stragglers found, 2 could not run (bad input, failed probe).
    """


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="straggler", standalone_mode=False)
    except StragglerError as e:
        click.echo(f"straggler: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("straggler: aborted", err=True)
        sys.exit(EXIT_FAILED)
    except click.exceptions.NoArgsIsHelpError as e:  # `straggler` alone: the help, as asked
        click.echo(e.ctx.get_help())
        sys.exit(EXIT_FAILED)
    except click.ClickException as e:  # usage errors too: one line, with where to look
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        msg = " ".join(e.format_message().split()).rstrip(".")
        click.echo(f"straggler: error: {msg}{hint}", err=True)
        sys.exit(EXIT_FAILED)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
