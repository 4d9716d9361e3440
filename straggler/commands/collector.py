"""`straggler collector`: run the fleet collector service (see docs/collector.md)."""

from __future__ import annotations

from pathlib import Path

import click

from straggler.collector.settings import DEFAULT_CONFIG, TOKEN_ENV, CollectorSettings  # (light)


@click.command("collector")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"TOML config file [default: {DEFAULT_CONFIG} when it exists].",
)
@click.option("--address", default=None, help=f"Address to bind [default: {CollectorSettings.address}].")
@click.option("--port", type=int, default=None, help=f"TCP port [default: {CollectorSettings.port}].")
@click.option(
    "--db",
    "db_path",
    default=None,
    metavar="PATH|URL",
    help="SQLite database file, or a postgresql://USER@HOST:PORT/DATABASE URL (needs "
    f"straggler[postgres]) [default: {CollectorSettings.db_path}].",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"File holding the bearer token (or set {TOKEN_ENV}).",
)
@click.option("--check", is_flag=True, help="Validate the configuration and the token, print the settings, exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: print the settings as JSON.")
def collector(config_path, address, port, db_path, token_file, check, as_json):
    """Run the fleet collector: result ingest, fleet view, /metrics, cluster scans.

    --check runs the start's own checks for real (the database is opened, or created and removed
    again; the address is bound and released): run while this collector is running, it reports the
    collector's own port as in use."""
    from straggler.collector.settings import check_start, load_settings, load_token
    from straggler.config import option_names

    settings = load_settings(
        config_path,
        overrides={"address": address, "port": port, "db_path": db_path, "token_file": token_file},
        option_names=option_names(click.get_current_context().command.params),
    )
    load_token(settings)  # fail early, with every other problem already reported
    check_start(settings)  # --check fails exactly when the start would
    if check:
        from straggler.config import render

        click.echo(render(settings, as_json))
        return 0
    from straggler.collector.service import serve

    serve(settings, load_token(settings))
    return 0
