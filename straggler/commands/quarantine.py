"""`straggler quarantine`: the nodes straggler drained; drain and resume by hand; Slurm placement hints.

Thin: each subcommand calls the collector's quarantine API (``straggler.collector.quarantine_client``)
or, without ``--collector``, the drain action (``straggler.drain.ScontrolAction``) directly, and
renders the answer (a table, or ``--json``). See docs/collector.md "Quarantine".
"""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path

import click

from straggler.errors import InputError
from straggler.token import read_token

COLLECTOR_ENV = "STRAGGLER_COLLECTOR_URL"
TOKEN_ENV = "STRAGGLER_TOKEN_FILE"


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _required_token(token_file) -> str:
    if token_file is None:
        raise InputError(f"--collector needs --token-file (or {TOKEN_ENV}): the collector's bearer token")
    return read_token(token_file)


def _ts(ts) -> str:
    import time

    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _console():
    from rich.console import Console

    return Console()


collector_option = click.option(
    "--collector", envvar=COLLECTOR_ENV, default=None, help=f"The collector's URL [env {COLLECTOR_ENV}]."
)
token_option = click.option(
    "--token-file",
    envvar=TOKEN_ENV,
    type=click.Path(dir_okay=False),
    default=None,
    help=f"File holding the collector's bearer token (drain, resume) [env {TOKEN_ENV}].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")


@click.group("quarantine")
def quarantine():
    """The quarantine loop: nodes straggler drained, drain and resume by hand, placement hints.

    A node drained by straggler is retested by its agent when idle and resumed after N consecutive
    clean retests (the collector's quarantine_resume_passes)."""


@quarantine.command("list")
@collector_option
@json_option
def list_cmd(collector, as_json):
    """The nodes drained by straggler and the circuit breaker's state."""
    from straggler.collector import quarantine_client as qc

    if collector is None:
        raise InputError(f"list needs --collector (or {COLLECTOR_ENV}): the collector holds the quarantine state")
    doc = qc.state(collector)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return 0
    from straggler.scanview import compact_table

    console = _console()
    b = doc["breaker"]
    console.print(
        f"straggler quarantine: {len(doc['nodes'])} node(s) drained (action {doc['action']}, "
        f"resume after {doc['resume_passes']} clean retests)",
        highlight=False,
    )
    table = compact_table()
    for col in ("host", "since", "passes", "rule", "by", "reason"):
        table.add_column(col, no_wrap=col in ("host", "since"))
    for n in doc["nodes"]:
        table.add_row(
            n["host"],
            _ts(n["since_ts"]),
            f"{n['passes']}/{doc['resume_passes']}",
            n["rule"] or "",
            n["by"] or "",
            n["reason"] or "",
        )
    console.print(table)
    console.print(
        f"circuit breaker: {'TRIPPED (refusing drains)' if b['tripped'] else 'ok'}; "
        f"{b['drained_in_window']} of {b['fleet_hosts']} hosts drained within {b['window_s']:g} s "
        f"(limit {b['limit']})",
        highlight=False,
    )
    return 0


@quarantine.command("show")
@click.argument("host")
@collector_option
@click.option("--limit", type=int, default=50, show_default=True, help="Events shown, newest first.")
@json_option
def show(host, collector, limit, as_json):
    """One node's quarantine state and its history (every drain, retest, resume, refusal)."""
    from straggler.collector import quarantine_client as qc

    if collector is None:
        raise InputError(f"show needs --collector (or {COLLECTOR_ENV}): the collector holds the audit")
    doc = qc.history(collector, host, limit)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return 0
    from straggler.scanview import compact_table

    node = doc["node"]
    console = _console()
    console.print(
        f"{host}: {node['state'] if node else 'never drained by straggler'}"
        + (f" since {_ts(node['since_ts'])} ({node['reason']})" if node else ""),
        highlight=False,
    )
    table = compact_table()
    for col in ("when", "action", "rule", "by", "reason"):
        table.add_column(col, no_wrap=col in ("when", "action"))
    for e in doc["events"]:
        outcome = "" if e["outcome"] == "ok" else f" ({e['outcome']})"
        table.add_row(_ts(e["ts"]), e["action"] + outcome, e["rule"] or "", e["by"] or "", e["reason"] or "")
    console.print(table)
    return 0


def _act(what: str, host: str, reason: str, by: str, collector, token_file, as_json) -> int:
    if collector is not None:
        from straggler.collector import quarantine_client as qc

        token = _required_token(token_file)
        doc = (
            qc.drain(collector, token, host, reason, by)
            if what == "drain"
            else qc.resume(collector, token, host, reason, by)
        )
        doc["recorded"] = True
    else:
        if token_file is not None:
            raise InputError("--token-file needs --collector")
        from straggler.drain import ScontrolAction

        action = ScontrolAction()
        action.drain(host, reason) if what == "drain" else action.resume(host)
        doc = {"host": host, "action": what, "state": action.state(host), "detail": reason, "recorded": False}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        done = {"drain": "drained", "resume": "resumed", "none": "unchanged"}.get(doc["action"], doc["action"])
        where = "recorded by the collector" if doc["recorded"] else "not recorded: no --collector"
        click.echo(f"{host}: {done} ({doc['detail']}; {where})")
    return 0


@quarantine.command("drain")
@click.argument("host")
@click.option("--reason", required=True, help="Why (shown by sinfo -R; 'straggler: ' is prepended when missing).")
@click.option("--by", default=None, help="Who [default: user@host].")
@collector_option
@token_option
@json_option
def drain(host, reason, by, collector, token_file, as_json):
    """Drain HOST by hand: through the collector when given (recorded; the circuit breaker does not
    apply to a drain by hand), else with scontrol directly."""
    from straggler.drain import REASON_PREFIX

    if not reason.startswith(REASON_PREFIX):
        reason = REASON_PREFIX + reason
    return _act("drain", host, reason, by or _who(), collector, token_file, as_json)


@quarantine.command("resume")
@click.argument("host")
@click.option("--reason", default="resumed by hand", show_default=True, help="Why (kept in the audit).")
@click.option("--by", default=None, help="Who [default: user@host].")
@collector_option
@token_option
@json_option
def resume(host, reason, by, collector, token_file, as_json):
    """Resume HOST by hand (at once, without waiting for clean retests): through the collector when
    given (recorded), else with scontrol directly."""
    return _act("resume", host, reason, by or _who(), collector, token_file, as_json)


@quarantine.command("hints")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@collector_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["scontrol", "slurm.conf"]),
    default="scontrol",
    show_default=True,
    help="scontrol update commands (take effect now, lost at a slurmctld restart) or a slurm.conf fragment.",
)
@click.option(
    "--features",
    "features_from",
    type=click.Choice(["slurm", "none"]),
    default="none",
    show_default=True,
    help="slurm: read each node's current features with sinfo and keep them (scontrol replaces the list).",
)
@token_option
@json_option
def hints(files, collector, fmt, features_from, as_json, token_file):
    """Slurm placement hints from the performance classes (perf_class A fastest .. D): per node a
    Weight (A 1 .. D 4: Slurm uses the lowest first) and a feature perf_a..perf_d (jobs ask for one
    speed with --constraint=perf_a). From result FILES (analysed here) or the collector's fleet."""
    from straggler.placement import node_hints, scontrol_commands, slurm_conf

    if bool(files) == (collector is not None):
        raise InputError("give result FILES or --collector (one of them)")
    if collector is not None:
        from straggler.collector import quarantine_client as qc

        entries = qc.gpus(
            collector, read_token(token_file) if token_file else None
        )  # the fleet view needs it unless open_reads
    else:
        from straggler.analysis import analyze
        from straggler.records import read_table

        entries = analyze(read_table(files)).devices.to_dict("records")
    found = node_hints(entries)
    current = _slurm_features() if features_from == "slurm" else None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "hints": [h.to_json() for h in found],
                    "scontrol": scontrol_commands(found, current),
                    "slurm_conf": slurm_conf(found),
                },
                indent=2,
            )
        )
        return 0
    if not found:
        raise InputError("no node has a performance class (classes need peer groups of 4 or more devices)")
    click.echo("\n".join(scontrol_commands(found, current)) if fmt == "scontrol" else slurm_conf(found).rstrip())
    return 0


def _slurm_features() -> dict[str, list[str]]:
    """node -> its current features, from ``sinfo -h -N -o '%N|%f'``."""
    import subprocess

    try:
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%f"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InputError(f"--features slurm: cannot run sinfo: {e}") from None
    if r.returncode != 0:
        raise InputError(f"--features slurm: sinfo failed: {' '.join((r.stderr or r.stdout).split())[:200]}")
    out: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        node, _, feats = line.partition("|")
        if node.strip():
            out[node.strip()] = [f for f in feats.strip().split(",") if f and f != "(null)"]
    return out
