"""Rich output of a scan: the progress display while probing and the per-device table after.

Used alike for a local scan and for a cluster scan through the collector. Rendering never changes
the data: it reads the ``device_report`` document.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.table import Table

ORDER = ("matmul", "membw", "pcie_h2d", "pcie_d2h", "allreduce")
VERDICT_STYLE = {"healthy": "green", "straggler": "bold red", "failed": "bold magenta", "no data": "yellow", "undecided": "yellow"}


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


def scan_table(report: dict, title: str = "") -> Table:
    """One row per device: each probe's median and ratio to its peers, telemetry, verdict.

    The value shown is the engine's robust median (transient dips left out) when there is one: the
    ratio is computed from it, so the two never disagree."""
    devices = report["devices"]
    units: dict[str, str] = {}
    for d in devices:
        for name, p in d["probes"].items():
            units.setdefault(name, p.get("unit") or "")
    probes = sorted(units, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    hosts = {d["host"] for d in devices}
    table = Table(title=title or None, show_lines=False)
    table.add_column("device")
    for name in probes:
        table.add_column(f"{name}\n{units[name]} (ratio)", justify="right")
    table.add_column("telemetry")
    table.add_column("verdict")
    for d in devices:
        name = f"{d['host']}/{d['gpu']}" if len(hosts) > 1 else str(d["gpu"])
        cells = []
        for p in probes:
            r = d["probes"].get(p)
            if r is None:
                cells.append("-")
                continue
            ratio = f" ({r['ratio']:.2f})" if r.get("ratio") is not None else ""
            value = r.get("estimate") if r.get("estimate") is not None else r.get("median")
            cell = f"{_num(value, '{:.4g}')}{ratio}"
            cells.append(f"[red]{cell}[/red]" if r.get("straggler") else cell)
        style = VERDICT_STYLE.get(d["verdict"], "")
        verdict = f"[{style}]{d['verdict']}[/{style}]: {d['reason']}" if style else d["reason"]
        table.add_row(name, *cells, _telemetry_cell(d["telemetry"]), verdict)
    return table


def render_scan(console: Console, report: dict, notice: str, scan_id: str, failures: list[dict]) -> None:
    console.print(f"[dim]{notice}[/dim]", highlight=False, soft_wrap=True)
    models = sorted({str(d.get("model")) for d in report["devices"] if d.get("model")})
    if report["devices"]:
        console.print(scan_table(report, title=f"scan {scan_id}" + (f" — {', '.join(models)}" if models else "")))
    for f in failures:
        console.print(f"[bold magenta]failed[/bold magenta] {f['host']}/{f['device']} (rank {f['rank']}) "
                      f"{f['probe']}: {f['error']}", highlight=False)
    n = report["stragglers"]
    summary = f"{len(report['devices'])} device(s), {n} straggler(s), {len(failures)} failure(s); " \
              f"analysis: {report['engine']}"
    console.print(("[bold red]" if n or failures else "[green]") + summary, highlight=False)


@contextmanager
def progress_display(console: Console, enabled: bool) -> Iterator[Callable[[dict], None] | None]:
    """A rich progress bar fed by worker messages (``on_event``); None when not enabled."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("starting workers", total=None)
        state = {"done": 0}

        def on_event(msg: dict) -> None:
            total = msg.get("world_size", 1) * len(msg.get("probes") or ()) or None
            if msg.get("t") == "phase" and msg.get("state") == "wait":
                progress.update(task, description="waiting for the start instant", total=total)
            elif msg.get("t") == "phase" and msg.get("state") == "start":
                progress.update(task, description=f"probing {msg['probe']}", total=total)
            elif msg.get("t") == "phase" and msg.get("state") == "done":
                state["done"] += 1
                progress.update(task, completed=state["done"], total=total)
            elif msg.get("t") == "progress":  # cluster scans: nodes reported
                progress.update(task, description=msg["description"], completed=msg.get("completed", 0),
                                total=msg.get("total"))

        yield on_event
