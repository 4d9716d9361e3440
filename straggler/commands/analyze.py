"""`straggler analyze FILE...`: find stragglers in result tables (see docs/analysis.md)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import click

from straggler.errors import EXIT_FAILED
from straggler.verdict import TOP, NothingToCompare, Undecided, exit_code, whole_hosts


def _pct(x) -> str:
    return "" if x is None or x != x else f"{x:+.1%}" if x < 0 else f"{x:.1%}"


# Columns dropped, in this order, when the table does not fit the terminal (all of them are in --json).
OPTIONAL = ("class", "basis", "cause", "deficit", "cost")
TIER_STYLE = {"straggler": "bold red", "undecided": "bold yellow", "slow": "yellow", "healthy": ""}


def _verdict(r: dict) -> str:
    """The tier (``STRAGGLER``, ``undecided``, ``slow``, ``healthy``) in a word or two: an undecided
    entry adds the further samples that would decide it (``undecided +12``), a degraded one says so."""
    tier = str(r.get("verdict") or ("straggler" if r["straggler"] else "healthy"))
    style = TIER_STYLE.get(tier, "")
    head = "STRAGGLER" if tier == "straggler" else tier
    head = f"[{style}]{head}[/]" if style else head
    needed = r.get("samples_needed")
    if tier == "undecided" and needed is not None and needed == needed:
        head += f" +{int(needed)}"
    return head + (", degraded" if r.get("degraded") else "")


def _table(title: str, rows: list[dict], drop: tuple[str, ...]):
    from straggler.analysis.causes import TEXT as CAUSE_TEXT
    from straggler.scanview import compact_table

    table = compact_table(title=title, title_justify="left")
    cols: dict[str, dict] = {
        "host": {"no_wrap": True},
        "gpu": {"no_wrap": True},
        "probe": {"no_wrap": True},
        "verdict": {"no_wrap": True},
        "deficit": {"justify": "right", "no_wrap": True},
        "cost": {"justify": "right", "no_wrap": True},
        "class": {"no_wrap": True},
        "basis": {},
        "cause": {},
    }
    for col, kw in cols.items():
        if col not in drop:
            table.add_column(col, **kw)
    for r in rows:
        cells = {
            "host": str(r["host"]),
            "gpu": str(r["gpu"]),
            "probe": str(r["probe"]),
            "verdict": _verdict(r),
            "deficit": _pct(r["deficit"]),
            "cost": _pct(r["cost"]),
            "class": r["perf_class"] if isinstance(r.get("perf_class"), str) else "-",
            "basis": str(r["basis"]),
            "cause": ", ".join(CAUSE_TEXT.get(c, c) for c in r["causes"]),
        }
        table.add_row(*(v for k, v in cells.items() if k not in drop))
    return table


def render(result, console, show_all: bool = False, top: int = TOP) -> None:
    """Print the result as a table ranked by cost: the first ``top`` stragglers and the first ``top``
    other entries (everything with ``show_all``), then the summary. Host and GPU are never cut: at
    a narrow width the basis, cause and deficit columns go (they are in ``--json``)."""
    from straggler.analysis.causes import TEXT as CAUSE_TEXT
    from straggler.scanview import print_fitted  # rich only: no probe, no torch

    d = result.devices  # ranked: stragglers first, by cost
    s = result.summary
    flagged = d["straggler"].to_numpy(dtype=bool)
    n_flagged = int(flagged.sum())
    shown = d if show_all else d[(flagged & (flagged.cumsum() <= top)) | (~flagged & ((~flagged).cumsum() <= top))]
    rows = shown.to_dict("records")
    title = (
        f"straggler analyze: {s['stragglers']} straggler(s) among {s['entries']} device x probe entries "
        f"({s['devices']} devices)"
    )
    print_fitted(console, [_table(title, rows, OPTIONAL[:k]) for k in range(len(OPTIONAL) + 1)])
    for r in rows:
        if r["straggler"]:
            console.print(
                f"[bold]{r['host']} {r['gpu']} {r['probe']}[/]: {r['evidence']} (deficit "
                f"{_pct(r['deficit'])}, cost {_pct(r['cost'])}, basis {r['basis']})",
                highlight=False,
            )
    hidden = len(d) - len(shown)
    if hidden:
        more_flagged = n_flagged - int(shown["straggler"].sum())
        parts = [
            f"{more_flagged} stragglers" if more_flagged else "",
            f"{hidden - more_flagged} other entries" if hidden - more_flagged else "",
        ]
        console.print(f"(not shown: {', '.join(p for p in parts if p)}; --all shows them)", highlight=False)
        if more_flagged:
            console.print(
                "stragglers by cause: "
                + ", ".join(
                    f"{CAUSE_TEXT.get(c, c)} {n}" for c, n in sorted(s["causes"].items(), key=lambda kv: -kv[1])
                )
                + "; by probe: "
                + ", ".join(f"{p} {v['stragglers']}" for p, v in s["probes"].items()),
                highlight=False,
            )
    near = d["host"].isin(d["host"][flagged].unique()).to_numpy(dtype=bool)  # only a host with a flag can be whole
    for line in whole_hosts(d["host"][near], d["gpu"][near], flagged[near]):
        console.print(line, highlight=False)
    for job in s["job_cost"]:
        what = f"{job['probe']} on {job['model']}: a {job['job_devices']}-device synchronous job"
        if job["speedup"] is not None:
            console.print(f"{what} runs {job['speedup']:.2%} faster without the flagged devices", highlight=False)
        elif job["step_time_all"] is not None:  # too few devices left to run it without the flagged ones
            console.print(
                f"{what} takes {job['step_time_all']:.2f}x the healthy step time; too few devices "
                "are left to run it without the flagged ones",
                highlight=False,
            )
    if result.dropped:
        console.print("dropped rows: " + ", ".join(f"{n} {why}" for why, n in result.dropped.items()))
    tiers = s.get("verdicts") or {}
    console.print(
        "verdicts at the {:.1%} threshold: ".format(s["min_effect"])
        + ", ".join(f"{tier} {n}" for tier, n in tiers.items())
        + (f"; degraded {s['degraded']}" if s.get("degraded") else ""),
        highlight=False,
    )
    if (shown["verdict"] == "undecided").any():
        console.print(
            "undecided +N: N further samples would decide it (none shown: more samples of the device "
            "alone cannot; --json has undecided_reason)",
            highlight=False,
        )
    for g in s.get("groups") or ():
        if not _pct(g.get("spread_net")):  # a group too small to estimate its spread
            continue
        console.print(
            f"healthy spread of {g['probe']} on {g['model']} ({g['devices']} devices): "
            f"{_pct(g['spread_net'])} net of {_pct(g['noise'])} noise",
            highlight=False,
        )
    for line in warnings(result):
        console.print(f"[yellow]warning:[/] {line}", highlight=False)


def warnings(result) -> list[str]:
    """The analysis' warning lines (one per peer group whose normal spread reaches the threshold)."""
    return [str(w) for w in result.summary.get("warnings") or ()]


@click.command("analyze")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help='Print {"gpus": [...], "summary": {...}} as JSON.')
@click.option(
    "--history",
    "history_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Earlier results of the same devices (repeatable): samples, or per-scan summaries (docs/analysis.md).",
)
@click.option("--fdr", type=float, default=None, help="False-discovery rate [default: 0.01].")
@click.option(
    "--min-effect",
    type=float,
    default=None,
    help="The threshold T: a straggler slows a job by at least this fraction [default: 0.04].",
)
@click.option(
    "--min-effect-few",
    type=float,
    default=None,
    help="Smallest deficit flagged in peer groups of 2-3 devices [default: 0.10].",
)
@click.option("--job-sizes", default=None, help="Job sizes for the fleet cost, e.g. 8,64,512.")
@click.option(
    "--reference",
    "references",
    multiple=True,
    help="Reference value MODEL|PROBE=VALUE for devices without peers (repeatable).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file with analysis settings (keys as in docs/analysis.md).",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Show every entry [default: the 20 costliest stragglers and the 20 next other entries].",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the fleet report: one self-contained HTML file (docs/report.md).",
)
def analyze(
    files,
    as_json,
    history_files,
    fdr,
    min_effect,
    min_effect_few,
    job_sizes,
    references,
    config_path,
    show_all,
    report_path,
):
    """Find stragglers in result files (CSV, JSON Lines, Parquet, or a saved `straggler scan --json`).

    Exit code 0: no stragglers, nothing undecided; 1: stragglers found; 2: bad input, nothing to
    compare with, or no straggler but entries undecided at the threshold (could not decide)."""
    from straggler.analysis import AnalysisConfig
    from straggler.analysis import analyze as run
    from straggler.config import load
    from straggler.records import read_table

    config = load(
        AnalysisConfig,
        config_path,
        env_prefix="STRAGGLER_ANALYSIS_",
        required_file=bool(config_path),
        overrides={
            "fdr": fdr,
            "min_effect": min_effect,
            "min_effect_few": min_effect_few,
            "job_sizes": job_sizes,
            "references": list(references) or None,
        },
    )
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
        raise NothingToCompare(
            result.summary["devices"], d["host"], d["gpu"], "give more devices of a model, --history or --reference"
        )
    if as_json:
        result.write_json(sys.stdout)  # piece by piece: no copy of a large document
        sys.stdout.write("\n")
        for line in warnings(result):  # stdout holds the document: the warnings go to stderr
            click.echo(f"warning: {line}", err=True)
    else:
        render(result, console, show_all=show_all)
    if report_path is not None:  # after the table or document: a report that cannot be written is one line
        from straggler.htmlreport import write_cli_report

        write_cli_report(report_path, result.devices, result.summary, samples, history)
    s, d = result.summary, result.devices
    code = exit_code(s["stragglers"], int((d["verdict"] == "undecided").sum()))
    if code == EXIT_FAILED:  # no straggler, and undecided entries: not "healthy"
        undecided = d[d["verdict"] == "undecided"]
        needed = undecided["samples_needed"].max()
        raise Undecided(
            [f"{r.host}/{r.gpu} {r.probe}" for r in undecided.itertuples()],
            s["min_effect"],
            None if needed != needed else needed,
            what="entries",
        )
    return code
