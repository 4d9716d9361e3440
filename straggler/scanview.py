"""Rich output of a scan (the scan command's display): the progress display while probing and the
per-device table after.

Used alike for a local scan and for a cluster scan through the collector. Rendering never changes
the data: it reads the ``device_report`` document.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich import box
from rich.console import Console
from rich.table import Table

ORDER = ("matmul", "membw", "pcie_h2d", "pcie_d2h", "allreduce")
VERDICT_STYLE = {
    "healthy": "green",
    "straggler": "bold red",
    "failed": "bold magenta",
    "no data": "yellow",
    "undecided": "bold yellow",
    "slow": "yellow",
}


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _telemetry_cell(t: dict) -> str:
    parts = [f"{_num(t.get('sm_clock_mhz'), '{:.0f}')} MHz"]
    if t.get("power_w") is not None:
        parts.append(f"{t['power_w']:.0f} W")
    if t.get("temp_c") is not None:
        parts.append(f"{t['temp_c']:.0f} C")
    if t.get("pcie_gen") is not None:
        parts.append(f"PCIe {t['pcie_gen']}x{_num(t.get('pcie_width'), '{:.0f}')}")
    if t.get("throttle_reasons"):
        parts.append(t["throttle_reasons"])
    return " ".join(parts)


def _cell_width(cell, no_wrap: bool, seen: dict) -> int:
    """What a cell needs: all of its widest line if it must not wrap, else its longest word."""
    from rich.cells import cell_len
    from rich.text import Text

    key = (cell, no_wrap) if isinstance(cell, str) else None
    if key is not None and key in seen:
        return seen[key]
    text = Text.from_markup(cell) if isinstance(cell, str) else cell
    plain = text.plain if isinstance(text, Text) else str(text)
    width = max((cell_len(part) for part in (plain.splitlines() if no_wrap else plain.split())), default=0)
    if key is not None:
        seen[key] = width
    return width


def print_fitted(console: Console, tables: list[Table]) -> None:
    """Print the first table (widest layout first) that fits the console with every no-wrap cell
    (a host, a GPU) whole and every other cell no narrower than its longest word; if none fits, the
    last one at its own minimum width: lines run long, but a device's name is never cut."""
    seen: dict = {}  # the layouts share their cells: each distinct one is measured once
    for table in tables:
        need = table._extra_width + sum(  # rich shrinks only wrapping columns, and only while they can give
            table._get_padding_width(i) + max(_cell_width(c, col.no_wrap, seen) for c in [col.header, *col.cells])
            for i, col in enumerate(table.columns)
        )
        if need <= console.width:
            console.print(table)
            return
    console.print(tables[-1], width=need)


def compact_table(**kw) -> Table:
    """The tables' common look: a header rule, no frame, two spaces between columns."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, **kw)


def _value_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    ratio = f" ({r['ratio']:.2f})" if r.get("ratio") is not None else ""
    value = r.get("estimate") if r.get("estimate") is not None else r.get("median")
    cell = f"{_num(value, '{:.4g}')}{ratio}"
    return f"[red]{cell}[/red]" if r.get("straggler") else cell


def short_verdict(d: dict) -> str:
    """The table's verdict cell: the verdict and, in a few words, why (the full reason is in --json).
    An undecided device names its undecided probes and the samples that would decide them; a
    degraded one says so whatever its tier."""
    verdict, probes = d["verdict"], d["probes"]

    def named(p: str, r: dict) -> str:
        return f"{p} {r['ratio']:.2f}x" if r.get("ratio") is not None else p

    if verdict == "failed":
        detail = ", ".join(dict.fromkeys(f["probe"] for f in d["failures"]))
    elif verdict == "straggler":
        detail = "; ".join(
            named(p, r) + f" ({', '.join(r.get('causes') or ['unexplained'])})"
            for p, r in probes.items()
            if r.get("straggler")
        )
    elif verdict == "undecided" and all(str(r.get("basis") or "none").startswith("none") for r in probes.values()):
        detail = "no peers"
    elif verdict in ("undecided", "slow"):
        detail = ", ".join(named(p, r) for p, r in probes.items() if r.get("verdict") == verdict)
        if verdict == "undecided":
            detail += f"; {d['samples_needed']} more samples" if d.get("samples_needed") else "; too uncertain"
    else:
        detail = ""
    if verdict != "failed" and d.get("degraded"):
        lost = [
            named(p, r) + (f" -{r['change_loss']:.1%}" if r.get("change_loss") is not None else "")
            for p, r in probes.items()
            if r.get("degraded")
        ]
        detail = "; ".join(x for x in (detail, "degraded " + ", ".join(lost)) if x)
    style = VERDICT_STYLE.get(verdict, "")
    head = f"[{style}]{verdict}[/{style}]" if style else verdict
    return f"{head}: {detail}" if detail else head


def scan_tables(report: dict, title: str = "") -> list[Table]:
    """The per-device table in layouts from widest to narrowest (for :func:`print_fitted`): a column
    per probe (its robust median and ratio to the peers) with telemetry; without telemetry; one
    cell for every probe. The ratio is computed from the value shown, so the two never disagree."""
    devices = report["devices"]
    units: dict[str, str] = {}
    for d in devices:
        for name, p in d["probes"].items():
            units.setdefault(name, p.get("unit") or "")
    probes = sorted(units, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    hosts = {d["host"] for d in devices}
    names = [f"{d['host']}/{d['gpu']}" if len(hosts) > 1 else str(d["gpu"]) for d in devices]
    verdicts = [short_verdict(d) for d in devices]

    def table(per_probe: bool, telemetry: bool) -> Table:
        t = compact_table(title=title or None)
        t.add_column("device", no_wrap=True)
        if per_probe:
            for name in probes:
                t.add_column(f"{name} {units[name]} (ratio)", justify="right")
        else:
            t.add_column("probes: value (ratio)", no_wrap=True)
        if telemetry:
            t.add_column("telemetry")
        t.add_column("verdict")
        for d, name, verdict in zip(devices, names, verdicts):
            cells = [_value_cell(d["probes"].get(p)) for p in probes]
            if not per_probe:
                cells = ["\n".join(f"{p} {c}" for p, c in zip(probes, cells) if c != "-")]  # a probe a line
            t.add_row(name, *cells, *([_telemetry_cell(d["telemetry"])] if telemetry else []), verdict)
        return t

    return [table(True, True), table(True, False), table(False, False)]


def scan_table(report: dict, title: str = "") -> Table:
    """The widest layout: a column per probe, with telemetry."""
    return scan_tables(report, title)[0]


def shown_devices(devices: list[dict], top: int) -> tuple[list[dict], str | None]:
    """The devices a table shows without ``--all``: past ``2 * top`` devices, the ``top`` costliest
    of those not healthy (stragglers first, then failed, undecided, slow) and the first ``top``
    others, in that order; and the line saying what was left out (None when nothing was)."""
    if len(devices) <= 2 * top:
        return devices, None
    rank = {"straggler": 0, "failed": 1, "undecided": 2, "slow": 3}

    def cost(d: dict) -> float:
        return max((p.get("cost") or 0.0 for p in d["probes"].values()), default=0.0)

    flagged = sorted((d for d in devices if d["verdict"] in rank), key=lambda d: (rank[d["verdict"]], -cost(d)))
    others = [d for d in devices if d["verdict"] not in rank]
    shown = flagged[:top] + others[:top]
    hidden: dict[str, int] = {}
    for d in flagged[top:] + others[top:]:
        hidden[d["verdict"]] = hidden.get(d["verdict"], 0) + 1
    return shown, "(not shown: " + ", ".join(f"{n} {v}" for v, n in hidden.items()) + "; --all shows them)"


def render_scan(
    console: Console, report: dict, notice: str, scan_id: str, failures: list[dict], show_all: bool = False
) -> None:
    from straggler.verdict import TOP, whole_hosts

    console.print(f"[dim]{notice}[/dim]", highlight=False)
    models = sorted({str(d.get("model")) for d in report["devices"] if d.get("model")})
    devices, left_out = (report["devices"], None) if show_all else shown_devices(report["devices"], TOP)
    if devices:
        print_fitted(
            console,
            scan_tables(
                {**report, "devices": devices}, title=f"scan {scan_id}" + (f" — {', '.join(models)}" if models else "")
            ),
        )
    if left_out:
        console.print(left_out, highlight=False)
    for f in failures if show_all else failures[:TOP]:
        rank = f" (rank {f['rank']})" if f.get("rank") is not None else ""
        console.print(
            f"[bold magenta]failed[/bold magenta] {f['host']}/{f['device']}{rank} {f['probe']}: {f['error']}",
            highlight=False,
        )
    if not show_all and len(failures) > TOP:
        console.print(f"(not shown: {len(failures) - TOP} more failure(s); --all shows them)", highlight=False)
    devices = report["devices"]
    for line in whole_hosts(*([d[k] for d in devices] for k in ("host", "gpu", "straggler"))):
        console.print(line, highlight=False)
    n, tiers = report["stragglers"], [d["verdict"] for d in report["devices"]]
    others = "".join(f", {tiers.count(t)} {t}" for t in ("undecided", "slow") if t in tiers)
    degraded = sum(bool(d.get("degraded")) for d in report["devices"])
    summary = (
        f"{len(report['devices'])} device(s), {n} straggler(s){others}"
        + (f", {degraded} degraded" if degraded else "")
        + f", {len(failures)} failure(s)"
    )
    style = "[bold red]" if n or failures else "[bold yellow]" if "undecided" in tiers else "[green]"
    console.print(style + summary, highlight=False)
    console.print(f"[dim]analysis: {report['engine']}[/dim]", highlight=False)
    for line in (report.get("analysis") or {}).get("summary", {}).get("warnings") or ():
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)


@contextmanager
def progress_display(console: Console, enabled: bool) -> Iterator[Callable[[dict], None] | None]:
    """A rich progress bar fed by worker messages (``on_event``); None when not enabled. It names
    the phase from the first second (starting the workers, warming up, waiting, probing) and
    counts probes done only once their total is known."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting the probe workers", total=None, count="")
        done: list[int] = [0]  # probes done
        ready: set = set()  # ranks up

        def on_event(msg: dict) -> None:
            kind, phase = msg.get("t"), msg.get("state")
            total = msg.get("world_size", 1) * len(msg.get("probes") or ()) or None
            count = f"{done[0]}/{total} probes" if total else ""
            if kind == "hello":
                ready.add(msg.get("rank"))
                progress.update(
                    task,
                    description=f"starting the probe workers ({len(ready)}/{msg.get('world_size', '?')} up)",
                    total=total,
                    count=count,
                )
            elif kind == "phase" and phase == "warmup":
                progress.update(task, description=f"warming up {msg['probe']}", total=total, count=count)
            elif kind == "phase" and phase == "wait":
                progress.update(task, description="waiting for the start instant", total=total, count=count)
            elif kind == "phase" and phase == "start":
                progress.update(task, description=f"probing {msg['probe']}", total=total, count=count)
            elif kind == "phase" and phase == "done":
                done[0] += 1
                progress.update(
                    task, completed=done[0], total=total, count=f"{done[0]}/{total} probes" if total else ""
                )
            elif kind == "progress":  # cluster scans: nodes reported
                n, of = msg.get("completed", 0), msg.get("total")
                progress.update(
                    task, description=msg["description"], completed=n, total=of, count=f"{n}/{of} nodes" if of else ""
                )

        yield on_event
