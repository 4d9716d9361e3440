"""`straggler agent`: the per-node daemon (telemetry export, idle probes, spool, uploads)."""

from __future__ import annotations

import click


@click.command("agent")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML config file [default: /etc/straggler/agent.toml if it exists].",
)
@click.option("--node-name", "host", help="Name this node reports as [default: the hostname].")
@click.option("--host", "old_host", hidden=True, help="Deprecated spelling of --node-name.")
@click.option("--listen-address", help="/metrics bind address [default: 127.0.0.1].")
@click.option("--listen-port", type=int, help="/metrics port [default: 9401].")
@click.option("--telemetry", help="auto, nvml, cpu or fake:<scenario>.")
@click.option("--interval", "interval_s", type=float, help="Telemetry interval in seconds [default: 15].")
@click.option("--collector-url", help="Collector base URL, e.g. http://collector:9402.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the collector's bearer token.")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False),
    help="CA bundle (PEM) that verifies an https:// collector [default: the system's CAs].",
)
@click.option("--spool", "spool_path", type=click.Path(dir_okay=False), help="SQLite spool file.")
@click.option("--check", is_flag=True, help="Validate the configuration, print it, and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: print the configuration as JSON.")
def agent(config_path, check, as_json, old_host, **flags):
    """Run the node agent until SIGTERM. SIGHUP reloads the config; SIGUSR1 probes now (if idle).

    --check runs the start's own checks for real (the spool is opened, or created and removed again;
    the /metrics address is bound and released): run while this agent is running, it reports the
    agent's own port as in use."""
    import logging
    import sys

    from straggler.agent.daemon import Agent
    from straggler.agent.settings import check_start, load_settings
    from straggler.config import option_names

    if old_host is not None:
        flags["host"] = node_name_from_host(old_host, flags.get("host"))
    names = option_names(click.get_current_context().command.params)
    settings = load_settings(config_path, flags, option_names=names)
    check_start(settings)  # --check fails exactly when the start would
    if check:
        from straggler.config import render

        click.echo(render(settings.effective(), as_json))
        return 0
    logging.basicConfig(
        stream=sys.stderr, level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    daemon = Agent(settings, config_path=config_path, overrides=flags, option_names=names)
    daemon.install_signals()
    return daemon.run()


def node_name_from_host(value: str, node_name: str | None) -> str:
    """The node name an old ``--host VALUE`` gives (one release: a warning); refused when it looks
    like an address (``--host 0.0.0.0`` once named the node "0.0.0.0" and still listened on loopback)
    or when ``--node-name`` is given too."""
    import ipaddress

    from straggler.errors import InputError

    if node_name is not None:
        raise InputError("--host is the old spelling of --node-name: give only --node-name")
    bare = value.strip()
    if bare.startswith("[") and "]" in bare:  # [::1] or [::1]:9401
        bare = bare[1 : bare.index("]")]
    elif bare.count(":") == 1:  # 10.0.0.1:9401
        bare = bare.split(":")[0]
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        click.echo(
            "straggler: warning: --host is deprecated: it names this node; use --node-name "
            f"{value} (--listen-address is the /metrics bind address)",
            err=True,
        )
        return value
    raise InputError(
        f"--host {value}: looks like an address, and --host names this node; "
        "--listen-address sets the /metrics bind address, --node-name the node's name"
    )
