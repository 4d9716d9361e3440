"""`straggler scan`: measure every device of this node (or, through a collector, a cluster) at once.

Thin: parse the options, call ``straggler.remeasure.remeasure`` over the rounds of
``straggler.probes.runner.run_scan`` (or one round of the collector client), build the per-device report, render it (rich table, or ``--json``), write ``--output``. Heavy imports
(torch, pandas) happen inside, never at import.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from straggler.errors import EXIT_FAILED, InputError, ProbeError
from straggler.probes.plan import DEFAULT_DURATION_S, ScanSettings  # (light: no torch)
from straggler.remeasure import DEFAULT_MAX_ROUNDS


@click.command("scan")
@click.option(
    "--probes",
    default="all",
    show_default=True,
    help="Comma-separated probes: matmul, membw, pcie (GPU only), allreduce; or 'all'.",
)
@click.option(
    "--duration",
    "duration_s",
    type=float,
    default=None,
    help=f"Seconds per probe [default: {DEFAULT_DURATION_S['cpu']:g} on CPU cores, "
    f"{DEFAULT_DURATION_S['cuda']:g} on GPUs and in a cluster scan].",
)
@click.option("--device", default=ScanSettings.device, show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--samples",
    type=int,
    default=ScanSettings.samples,
    show_default=True,
    help="Samples (windows) per device and probe.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable result on stdout.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write every raw sample (canonical result table): .csv, .jsonl or .parquet.",
)
@click.option(
    "--scan-id",
    default=None,
    help="Id stamped on every sample: 1-128 letters, digits, '.', '_', '-' [default: time-host-random].",
)
@click.option("--start-at", type=float, default=None, help="Unix time of the first probe (after warm-up).")
@click.option(
    "--deadline",
    "deadline_s",
    type=float,
    default=None,
    help="Kill the scan after this many seconds (samples measured so far are kept). With "
    "--collector: how long to wait for the cluster scan [default: the time it may need, "
    "at least 600]; one shorter than the scan may need is refused.",
)
@click.option(
    "--max-rounds",
    type=int,
    default=None,
    help="Rounds at most: while a device is undecided, measure every device again with the "
    "samples that would decide it, samples of all rounds combined (1: no re-measurement) "
    f"[default: {DEFAULT_MAX_ROUNDS}; a cluster scan through --collector runs one round].",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Show every device [default: past 40 devices, the 20 costliest of those not healthy and the "
    "first 20 others, then counts].",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the fleet report of this scan: one self-contained HTML file (docs/report.md).",
)
@click.option("--collector", default=None, help="Run a cluster scan through this collector URL.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File holding the collector's bearer token (with --collector).",
)
def scan(
    probes,
    duration_s,
    device,
    samples,
    as_json,
    output,
    scan_id,
    start_at,
    deadline_s,
    max_rounds,
    show_all,
    report_path,
    collector,
    token_file,
):
    """Measure every device of this node at the same moment and flag the slow ones.

    Exit codes: 0 healthy, 1 stragglers found, 2 could not run or could not decide (no straggler,
    but a device undecided at the threshold).
    """
    from straggler.probes.devices import parse_probes

    probe_list = parse_probes(probes)
    if output is not None:
        from straggler.records import check_writable

        check_writable(output)  # a bad suffix or an unwritable place fails now, not after the probes ran
    if collector is None and token_file is not None:
        raise InputError("--token-file needs --collector")
    if scan_id is not None:
        from straggler.scanproto import scan_id_problem

        if scan_id_problem(scan_id):
            raise InputError(f"--scan-id: {scan_id_problem(scan_id)}")
    if max_rounds is not None and max_rounds < 1:
        raise InputError(f"--max-rounds must be >= 1, got {max_rounds}")
    if collector is not None and (max_rounds or 1) > 1:
        raise InputError("--max-rounds needs a local scan: a cluster scan through --collector runs one round")
    from dataclasses import replace

    from rich.console import Console

    from straggler.scanview import progress_display
    from straggler.probes.plan import ScanResult
    from straggler.remeasure import DEFAULT_MAX_ROUNDS, analysis_verdicts, remeasure

    err = Console(stderr=True)
    with progress_display(err, enabled=err.is_terminal and not as_json) as on_event:
        if collector is not None:
            rounds = remeasure(
                lambda p, n: _cluster(collector, token_file, p, duration_s, deadline_s, on_event),
                analysis_verdicts,
                probe_list,
                samples,
                max_rounds=1,
            )
        else:
            from straggler.probes.plan import ScanSettings
            from straggler.probes.runner import ScanRounds

            # torchrun/srun: every rank runs the same command; rank 0 decides the rounds, the others follow
            local = ScanRounds(
                ScanSettings(
                    probes=probe_list,
                    duration_s=duration_s,
                    device=device,
                    scan_id=scan_id,
                    start_at=start_at,
                    deadline_s=deadline_s,
                    samples=samples,
                ),
                on_event,
            )
            with local.between_rounds():
                try:
                    rounds = remeasure(
                        local.measure,
                        analysis_verdicts,
                        probe_list,
                        samples,
                        max_rounds=max_rounds or DEFAULT_MAX_ROUNDS,
                        fits=local.fits,
                    )
                finally:
                    local.close()
            if local.stopped_by and rounds.stopped.startswith("scan stopped by"):
                rounds.failures.append(local.stop_failure())
    first = rounds.first
    assert isinstance(first, ScanResult)  # what every measure function here returns
    if not first.root:
        return 0  # a non-zero rank of a torchrun/srun scan: rank 0 reports
    return _report(
        replace(first, samples=rounds.samples, failures=rounds.failures), as_json, output, rounds, show_all, report_path
    )


def _report(
    res, as_json: bool, output: str | None, rounds=None, show_all: bool = False, report_path: str | None = None
) -> int:
    """``rounds``: the :class:`straggler.remeasure.Remeasured` the samples came from (its rounds and why
    it stopped are reported), or None."""
    from straggler.jsonsafe import json_safe
    from straggler.scanverdict import device_report

    # first, so that nothing measured is lost whatever happens next
    write_error = _write(res, output, as_json) if output is not None else None
    report = device_report(res.samples, res.failures, res.devices)
    if as_json:
        from straggler.slurm import context

        doc = {
            "scan_id": res.scan_id,
            "host": res.host,
            **context(os.environ),
            "backend": res.backend,
            "notice": res.notice,
            "devices": report["devices"],
            "failures": res.failures,
            "analysis": report["analysis"],
            "engine": report["engine"],
            "rounds": rounds.to_json() if rounds else None,
            "samples": res.samples,
        }
        sys.stdout.write(json.dumps(json_safe(doc), allow_nan=False) + "\n")
    else:
        from rich.console import Console

        from straggler.scanview import render_scan

        console = Console()
        render_scan(console, report, res.notice, res.scan_id, res.failures, show_all=show_all)
        if rounds is not None:
            console.print(rounds.line(), highlight=False)
    if report_path is not None:
        write_error = write_error or _html(report_path, report, res.samples)
    if write_error is not None:
        raise InputError(write_error)
    if report["cannot_decide"] is not None and not res.failures:  # undecided is not healthy: exit 2
        raise report["cannot_decide"]
    if report["exit_code"] == EXIT_FAILED:
        raise ProbeError(_failure_line(res.failures, output))
    return report["exit_code"]


def _write(res, output: str, as_json: bool) -> str | None:
    """Write the samples to ``output``; if that fails, to a fallback file. None, or the error line
    (naming the fallback file that holds the samples)."""
    import tempfile

    from straggler.records import write_table

    try:
        write_table(res.samples, output)
        return None
    except (OSError, ValueError, TypeError) as e:  # a disk, a permission, a value pyarrow cannot store
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:160]
    fallback = Path(tempfile.gettempdir()) / f"straggler-{res.scan_id}.jsonl"
    try:
        write_table(res.samples, fallback)
    except (OSError, ValueError, TypeError) as e:
        where = "they are only in the --json output above" if as_json else "they are lost"
        return f"--output {output}: cannot write ({why}), nor the fallback {fallback} ({e}); {where}"
    return f"--output {output}: cannot write ({why}); the {len(res.samples)} samples are in {fallback}"


def _html(path: str, report: dict, samples: list[dict]) -> str | None:
    """Write the scan's fleet report from its analysis; None, or the error line."""
    doc = report["analysis"]
    if not doc.get("gpus"):
        return f"--report {path}: no report: {report['engine']}"
    import pandas as pd

    from straggler.htmlreport import write_cli_report
    from straggler.records import to_frame

    try:
        write_cli_report(path, pd.DataFrame(doc["gpus"]), doc["summary"], to_frame(samples))
    except InputError as e:
        return str(e)
    return None


def _failure_line(failures: list[dict], output: str | None) -> str:
    kept = f"; samples measured so far kept in {output}" if output else ""
    if not failures:
        return "no samples were measured" + kept
    f = failures[0]
    more = f" (+{len(failures) - 1} more failure(s))" if len(failures) > 1 else ""
    return f"{f['host']}/{f['device']} {f['probe']}: {f['error']}{more}{kept}"


def _cluster(url, token_file, probes, duration_s, deadline_s, on_event):
    """A cluster scan through the collector, returned in the shape of a local ScanResult."""
    if token_file is None:
        raise InputError("--collector needs --token-file (the collector's bearer token)")
    from straggler.token import read_token

    token = read_token(token_file)
    from straggler.collector.client import DEFAULT_START_DELAY_S, cluster_scan
    from straggler.probes.budget import budget_problem, scan_needed_s
    from straggler.probes.plan import DEFAULT_DURATION_S, ScanResult
    from straggler.scanproto import FINAL_STATES

    def on_progress(status: dict) -> None:
        if on_event is not None:
            nodes = status.get("nodes") or {}
            on_event(
                {
                    "t": "progress",
                    "description": f"scan {status.get('scan_id', '')}: nodes reported",
                    "completed": sum(s in FINAL_STATES for s in nodes.values()),
                    "total": len(nodes) or None,
                }
            )

    # The fleet's nodes may be GPU nodes: their power and thermal steady state needs the GPU duration.
    duration = duration_s or DEFAULT_DURATION_S["cuda"]
    # the client waits for the scan's start and the time the scan may need (one source: probes/budget.py)
    wait_s = max(600.0, DEFAULT_START_DELAY_S + scan_needed_s(len(probes), duration))
    if deadline_s is not None:
        problem = budget_problem(
            len(probes),
            duration,
            deadline_s - DEFAULT_START_DELAY_S,
            f"--deadline {deadline_s:g} s less the {DEFAULT_START_DELAY_S:g} s start delay",
        )
        if problem:
            raise InputError(problem)
        wait_s = deadline_s
    doc = cluster_scan(url, token, list(probes), duration, wait_s, on_progress=on_progress)
    nodes, errors = doc.get("nodes") or {}, doc.get("errors") or {}
    failures = [
        {
            "host": h,
            "device": "-",
            "rank": None,
            "probe": "scan",
            "error": errors.get(h) or (f"node {s}" + (" when the scan timed out" if doc.get("timed_out") else "")),
        }
        for h, s in sorted(nodes.items())
        if s != "done"
    ]
    return ScanResult(
        scan_id=doc["scan_id"],
        host=url,
        backend="collector",
        notice=f"cluster scan through {url}: {len(nodes)} node(s)",
        samples=list(doc.get("samples") or []),
        failures=failures,
    )
