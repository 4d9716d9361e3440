"""`straggler analyze FILE...`: find stragglers in result tables (see docs/analysis.md)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import click

from straggler.errors import EXIT_OK, EXIT_STRAGGLERS, InputError

CAUSE_TEXT = {
    "power_capped": "power-capped, lower clock", "thermal": "thermal slowdown", "hw_slowdown": "HW slowdown",
    "pcie_link": "PCIe link degraded", "memory": "memory", "contention": "contention",
    "whole_node": "whole node slow", "low_clock": "low clock", "unexplained": "unexplained",
}


def _pct(x) -> str:
    return "" if x is None or x != x else f"{x:+.1%}" if x < 0 else f"{x:.1%}"


def render(result, console, show_all: bool = False, top: int = 20) -> None:
    """Print the result as a rich table ranked by cost (stragglers first), then the summary."""
    from rich.table import Table

    d = result.devices
    shown = d if show_all else d[d["straggler"] | (d.index < d["straggler"].sum() + top)]
    s = result.summary
    table = Table(title=f"straggler analyze: {s['stragglers']} straggler(s) among {s['entries']} "
                        f"device x probe entries ({s['devices']} devices)", title_justify="left")
    for col, kw in (("host", {}), ("gpu", {"overflow": "fold"}), ("probe", {}), ("verdict", {"no_wrap": True}),
                    ("deficit", {"justify": "right", "no_wrap": True}),
                    ("cost", {"justify": "right", "no_wrap": True}), ("basis", {"overflow": "fold"}),
                    ("cause", {"overflow": "fold"})):
        table.add_column(col, **kw)
    for r in shown.itertuples(index=False):
        verdict = "[bold red]STRAGGLER[/]" if r.straggler else "ok"
        table.add_row(str(r.host), str(r.gpu), str(r.probe), verdict, _pct(r.deficit), _pct(r.cost),
                      str(r.basis), ", ".join(CAUSE_TEXT.get(c, c) for c in r.causes))
    console.print(table)
    for r in d[d["straggler"]].itertuples(index=False):
        console.print(f"[bold]{r.host} {r.gpu} {r.probe}[/]: {r.evidence}", highlight=False)
    if len(shown) < len(d):
        console.print(f"({len(d) - len(shown)} more healthy entries not shown; --all shows them)")
    for job in s["job_cost"]:
        if job["speedup"] is None:  # every device of the group flagged: no job without them
            continue
        console.print(f"{job['probe']} on {job['model']}: a {job['job_devices']}-device synchronous job runs "
                      f"{job['speedup']:.2%} faster without the flagged devices")
    if result.dropped:
        console.print("dropped rows: " + ", ".join(f"{n} {why}" for why, n in result.dropped.items()))


@click.command("analyze")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help='Print {"gpus": [...], "summary": {...}} as JSON.')
@click.option("--history", "history_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Earlier results of the same devices (repeatable).")
@click.option("--fdr", type=float, default=None, help="False-discovery rate [default: 0.01].")
@click.option("--min-effect", type=float, default=None,
              help="Smallest deficit flagged, as a fraction [default: 0.0225].")
@click.option("--min-effect-few", type=float, default=None,
              help="Smallest deficit flagged in peer groups of 2-3 devices [default: 0.10].")
@click.option("--job-sizes", default=None, help="Job sizes for the fleet cost, e.g. 8,64,512.")
@click.option("--reference", "references", multiple=True,
              help="Reference value MODEL|PROBE=VALUE for devices without peers (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file with analysis settings (keys as in docs/analysis.md).")
@click.option("--all", "show_all", is_flag=True, help="Show every entry, not only stragglers and the top 20.")
def analyze(files, as_json, history_files, fdr, min_effect, min_effect_few, job_sizes, references,
            config_path, show_all):
    """Find stragglers in result files (CSV, JSON Lines, Parquet).

    Exit code 0: no stragglers; 1: stragglers found; 2: bad input."""
    from straggler.analysis import AnalysisConfig
    from straggler.analysis import analyze as run
    from straggler.config import load
    from straggler.records import read_table

    config = load(AnalysisConfig, config_path, env_prefix="STRAGGLER_ANALYSIS_", required_file=bool(config_path),
                  overrides={"fdr": fdr, "min_effect": min_effect, "min_effect_few": min_effect_few,
                             "job_sizes": job_sizes, "references": list(references) or None})
    from rich.console import Console

    console = Console(stderr=as_json)
    # Progress on a terminal only (quiet under --json and in pipes).
    status = console.status("reading results") if console.is_terminal and not as_json else nullcontext()
    with status as live:
        samples = read_table(files)
        history = read_table(history_files) if history_files else None
        if live is not None:
            live.update(f"analysing {len(samples):,} samples")
        result = run(samples, history, config)
    if (result.devices["basis"] == "none").all():  # not one entry has anything to compare with
        d = result.devices.iloc[0]
        if result.summary["devices"] == 1:
            raise InputError(f"only one device (host {d['host']}, gpu {d['gpu']}) and no history or reference: "
                             "nothing to compare it with; give more devices, --history or --reference")
        raise InputError(f"{result.summary['devices']} devices but none has a peer (same model, probe and "
                         "settings), history or reference: nothing to compare them with; give more devices "
                         "of a model, --history or --reference")
    if as_json:
        click.echo(result.to_json_text())
    else:
        render(result, console, show_all=show_all)
    return EXIT_STRAGGLERS if result.summary["stragglers"] else EXIT_OK
