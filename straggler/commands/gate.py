"""`straggler gate`: may this node run the job? Decided within a hard time budget.

Thin: parse, run :class:`straggler.gate.Gate` under a watchdog that ends the gate at its budget
(killing every child it started), print one line per finding and a summary with the time of each
phase (or ``--json``), then act (``--drain``) and exit as ``--on-error`` says. Heavy imports live
in the phases, never here.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import click

from straggler.errors import EXIT_FAILED, EXIT_OK, EXIT_STRAGGLERS, InputError
from straggler.gate import GATE_DURATION_S, GateSettings  # (light: no probe, no torch)

ON_ERROR = ("pass", "fail", "drain")
DRAIN_REQUEST_S = 5.0  # the collector's answer to a drain request (past the budget, the watchdog ends the gate)
WATCHDOG_MARGIN_S = 0.3  # the watchdog fires this long before the budget: killing and printing take time


@click.command("gate")
@click.option(
    "--budget",
    "budget_s",
    type=float,
    default=GateSettings.budget_s,
    show_default=True,
    help="Seconds the whole gate may take, start-up included; at the budget every check still "
    "running is killed and the gate could not decide.",
)
@click.option(
    "--gpus",
    default=None,
    help="GPU indices the job will use (0,2-3) [default: $CUDA_VISIBLE_DEVICES, $SLURM_STEP_GPUS, "
    "$SLURM_JOB_GPUS, else all].",
)
@click.option(
    "--device",
    default=GateSettings.device,
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="What to probe: auto (GPUs when NVML sees any, else CPU cores), cpu or cuda.",
)
@click.option(
    "--probes",
    default=",".join(GateSettings.probes),
    show_default=True,
    help="Probes to run after the NVML checks (pcie on GPUs only); 'none': NVML checks only.",
)
@click.option(
    "--duration",
    "duration_s",
    type=float,
    default=None,
    help=f"Seconds per probe [default: {GATE_DURATION_S['cpu']:g} on CPU cores, {GATE_DURATION_S['cuda']:g} on GPUs].",
)
@click.option(
    "--samples", type=int, default=GateSettings.samples, show_default=True, help="Samples per device and probe."
)
@click.option(
    "--max-rounds",
    type=int,
    default=GateSettings.max_rounds,
    show_default=True,
    help="Rounds at most (re-measurement of undecided devices, within the budget).",
)
@click.option(
    "--collector",
    default=None,
    help="Collector URL: the fleet reference (else its cached copy) and, with --drain and a token, "
    "the drain (its quarantine loop and circuit breaker decide).",
)
@click.option(
    "--token-file",
    envvar="STRAGGLER_TOKEN_FILE",
    type=click.Path(dir_okay=False),
    default=None,
    help="File holding the collector's bearer token (its fleet reads need it unless it sets "
    "open_reads; drains through it always) [env STRAGGLER_TOKEN_FILE].",
)
@click.option(
    "--telemetry",
    default=GateSettings.telemetry,
    show_default=True,
    help="NVML backend: auto, nvml or fake:<scenario>.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the last check's NVML counters and the cached fleet reference are kept "
    "[default: $STRAGGLER_STATE_DIR, /var/lib/straggler, else ~/.cache/straggler].",
)
@click.option(
    "--kernel-log",
    default=GateSettings.kernel_log,
    show_default=True,
    help="Kernel log to read XID events from (needs root for /dev/kmsg); '-': do not read.",
)
@click.option(
    "--on-error",
    type=click.Choice(ON_ERROR),
    default=None,
    help="What 'could not decide' (exit 2) becomes: pass (exit 0), fail (exit 1), drain (drain the "
    "node, exit 1) [default: exit 2; the Slurm wrappers pass --on-error pass].",
)
@click.option(
    "--drain",
    "drain",
    is_flag=True,
    help="On a failure, drain this node through scontrol with the finding as the reason.",
)
@click.option(
    "--node",
    default=None,
    help="Slurm node name to drain, and whose own results at the collector are left out of its fleet "
    "reference [default: $SLURMD_NODENAME, else the host name].",
)
@click.option("--scontrol", default="scontrol", show_default=True, help="The scontrol command to drain with.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable report on stdout.")
def gate(
    budget_s,
    gpus,
    device,
    probes,
    duration_s,
    samples,
    max_rounds,
    collector,
    token_file,
    telemetry,
    state_dir,
    kernel_log,
    on_error,
    drain,
    node,
    scontrol,
    as_json,
):
    """Check the devices a job is about to use, cheapest first, within --budget seconds.

    Exit codes: 0 pass, 1 fail (a device is a straggler or unhealthy), 2 could not decide (NVML
    missing or hung, a probe that hung, budget spent, nothing to compare with); --on-error maps 2.
    """
    from pathlib import Path

    from straggler.gate import Gate, GateSettings
    from straggler.probes.devices import parse_probes

    if not budget_s > 0:
        raise InputError(f"--budget must be > 0 seconds, got {budget_s}")
    from straggler.token import read_token

    token = read_token(token_file) if token_file else None
    wanted = _wanted_gpus(gpus)
    probe_list = () if probes.strip() == "none" else parse_probes(probes)
    settings = GateSettings(
        budget_s=budget_s,
        gpus=wanted,
        device=device,
        probes=probe_list,
        duration_s=duration_s,
        samples=samples,
        max_rounds=max_rounds,
        telemetry=telemetry,
        collector=collector,
        token=token,
        node=node,
        state_dir=Path(state_dir) if state_dir else None,
        kernel_log=kernel_log,
    )
    phase = ["start"]
    watchdog = _Watchdog(budget_s, phase, on_error, as_json)
    g = Gate(settings, on_phase=lambda name: phase.__setitem__(0, name))
    g.started = watchdog.process_start  # the budget counts from the process start
    report = g.run()
    watchdog.cancel()
    code = report.exit_code
    action = None
    if code == EXIT_FAILED and on_error is not None:
        code = {"pass": EXIT_OK, "fail": EXIT_STRAGGLERS, "drain": EXIT_STRAGGLERS}[on_error]
        action = f"--on-error {on_error}"
    drain_line = None
    if (drain and report.exit_code == EXIT_STRAGGLERS) or (on_error == "drain" and report.exit_code == EXIT_FAILED):
        drain_line = _drain(report, node, scontrol, collector, token)
    if as_json:
        doc = report.to_json()
        doc.update(
            decision=_decision(code),
            exit_code=code,
            raw_exit_code=report.exit_code,
            on_error=on_error,
            drain=drain_line,
        )
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        for f in report.findings:
            click.echo(("could not check: " if f.outcome == "error" else "") + f.line())
        ref = report.reference.note if report.reference else "none"
        how = f" ({action})" if action else ""
        click.echo(
            f"gate: {_decision(report.exit_code)}{how} on {report.host} in {report.elapsed_s:.1f} s of "
            f"{budget_s:g} s ({report.phase_line()}); reference: {ref}"
        )
        if drain_line:
            click.echo(drain_line)
    return code


def _decision(code: int) -> str:
    return {EXIT_OK: "pass", EXIT_STRAGGLERS: "fail"}.get(code, "could not decide")


def _wanted_gpus(gpus: str | None) -> tuple[int, ...] | None:
    from straggler.slurm import job_gpus, parse_indices

    try:
        if gpus is not None:
            return parse_indices(gpus, "--gpus")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible and all(p.strip().isdigit() for p in visible.split(",")):
            return parse_indices(visible, "CUDA_VISIBLE_DEVICES")
        return job_gpus(os.environ)
    except ValueError as e:
        raise InputError(str(e)) from None


def _process_age_s() -> float:
    """Seconds since this process started (interpreter start-up included), from /proc: the start
    time and the uptime are both counted from boot, so no wall-clock rounding enters."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _drain(report, node: str | None, scontrol: str, collector: str | None, token: str | None) -> str:
    """Drain this node; the line saying what was done (or why it could not be). With a collector and
    its token the collector drains (its quarantine loop records it, retests and resumes the node, and
    its circuit breaker may refuse: then the node stays in service); only when the collector cannot
    be asked does the gate drain through scontrol itself."""
    from straggler.drain import DrainError, ScontrolAction, drain_reason

    name = node or report.slurm.get("slurm_node") or report.host
    reason = drain_reason(report.findings)
    fallback = ""
    if collector and token:
        from straggler.collector import quarantine_client as qc
        from straggler.collector.client import CollectorError

        measured = {
            "findings": [f.line() for f in report.findings][:20],
            "slurm_job_id": report.slurm.get("slurm_job_id"),
        }
        try:
            doc = qc.request_drain(
                collector, token, name, reason, by=f"gate@{report.host}", measured=measured, timeout_s=DRAIN_REQUEST_S
            )
        except CollectorError as e:  # unreachable, or it refused (the loop is off): drain here instead
            fallback = f" (collector: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
        else:
            action = doc.get("action")
            if action == "drain":
                return f"drain: {name} drained by the collector, reason {reason!r}"
            if action == "refused":
                return (
                    f"drain: refused by the collector's circuit breaker, {name} stays in service: {doc.get('detail')}"
                )
            return f"drain: the collector did not drain {name} ({doc.get('state')}): {doc.get('detail')}"
    try:
        ScontrolAction(scontrol=scontrol).drain(name, reason)
    except DrainError as e:
        return f"drain: {e}{fallback}"
    return f"drain: {name} drained, reason {reason!r}{fallback}"


class _Watchdog:
    """Ends the gate at its budget, whatever it is doing: kills every child process (NVML check,
    probe workers), prints one line and exits as --on-error says for 'could not decide'."""

    def __init__(self, budget_s: float, phase: list, on_error: str | None, as_json: bool):
        self.process_start = time.monotonic() - _process_age_s()
        self.budget_s, self.phase, self.on_error, self.as_json = budget_s, phase, on_error, as_json
        left = budget_s - (time.monotonic() - self.process_start) - WATCHDOG_MARGIN_S
        self.timer = threading.Timer(max(left, 0.0), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.timer.cancel()

    def _fire(self) -> None:
        import psutil

        me = psutil.Process()
        kids = me.children(recursive=True)
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass
        code = {None: EXIT_FAILED, "pass": EXIT_OK, "fail": EXIT_STRAGGLERS, "drain": EXIT_STRAGGLERS}[self.on_error]
        line = (
            f"could not check: node budget {self.budget_s:g}s: budget spent during {self.phase[0]}; "
            f"{len(kids)} check process(es) killed"
        )
        if self.as_json:
            line = json.dumps(
                {
                    "exit_code": code,
                    "raw_exit_code": EXIT_FAILED,
                    "decision": _decision(code),
                    "findings": [
                        {
                            "device": "node",
                            "check": "budget",
                            "value": f"{self.budget_s:g}s",
                            "cause": "budget",
                            "outcome": "error",
                            "detail": f"budget spent during {self.phase[0]}",
                        }
                    ],
                }
            )
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        os._exit(code)
