"""The pre-job gate: decide within a hard time budget whether this node may run a job.

Phases, cheapest first (docs/gate.md): ``health`` (NVML without load, in a child killed at its
deadline: :mod:`straggler.probes.health`), ``reference`` (the fleet reference:
:mod:`straggler.reference`), ``probes`` (short synchronized matmul and membw, plus pcie on GPUs,
with re-measurement of undecided devices through :func:`straggler.remeasure.remeasure`, all
within the time left; the runner kills its workers at that deadline), ``judge`` (the analysis;
PCIe generation and width under load). Every finding is a :class:`straggler.finding.Finding`.

Outcome (:attr:`GateReport.exit_code`): 0 pass, 1 fail (a device is a straggler or unhealthy), 2
could not decide (NVML missing or hung, a probe that hung, budget spent, nothing to compare with).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import pandas as pd

from .errors import EXIT_FAILED, EXIT_OK, EXIT_STRAGGLERS
from .finding import ERROR, FAIL, Finding
from .reference import PEERS, FleetReference, write_json

DEFAULT_BUDGET_S = 30.0
HEALTH_LIMIT_S = 10.0  # NVML answers a full read of 8 GPUs in well under a second
REFERENCE_LIMIT_S = 3.0  # the collector's GET /api/v1/gpus
JUDGE_RESERVE_S = 5.0  # kept back from the probes for the analysis (imports pandas, scipy) and the report
GATE_PROBES = ("matmul", "membw", "pcie")
GATE_DURATION_S = {"cpu": 1.0, "cuda": 3.0}  # per probe: short; re-measurement adds samples when needed
NO_DRIVER = ("library_not_found", "NVML library not found", "NVIDIA driver not loaded")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")


@dataclass(frozen=True)
class GateSettings:
    budget_s: float = DEFAULT_BUDGET_S
    gpus: tuple[int, ...] | None = None  # GPU indices the job will use; None: all
    device: str = "auto"  # auto | cpu | cuda
    probes: tuple[str, ...] = GATE_PROBES  # () : NVML health only
    duration_s: float | None = None
    samples: int = 5
    max_rounds: int = 3
    telemetry: str = "auto"  # the health phase's NVML backend (fake:<scenario> in tests)
    collector: str | None = None
    token: str | None = field(default=None, repr=False)  # the collector's bearer token (fleet reads, drains)
    node: str | None = None  # this node's Slurm name (--node): its devices are no part of its fleet reference
    state_dir: Path | None = None  # last check's NVML counters and the cached fleet reference
    kernel_log: str = "/dev/kmsg"  # where XID events are read ("-": not read)


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    status: str  # ok | skipped: ... | error: ... | killed at the deadline


@dataclass
class GateReport:
    host: str
    budget_s: float
    findings: list[Finding] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    reference: FleetReference | None = None
    devices: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    rounds: dict | None = None
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # what could not be looked at, short of a finding

    @property
    def exit_code(self) -> int:
        if any(f.outcome == FAIL for f in self.findings):
            return EXIT_STRAGGLERS
        if any(f.outcome == ERROR for f in self.findings):
            return EXIT_FAILED
        return EXIT_OK

    def phase_line(self) -> str:
        return ", ".join(f"{p.name} {p.duration_s:.1f} s" for p in self.phases)

    def to_json(self) -> dict:
        return {
            "host": self.host,
            **self.slurm,
            "exit_code": self.exit_code,
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed_s, 3),
            "devices": self.devices,
            "reference": self.reference.to_json() if self.reference else None,
            "phases": [
                {"phase": p.name, "duration_s": round(p.duration_s, 3), "status": p.status} for p in self.phases
            ],
            "rounds": self.rounds,
            "notes": self.notes,
            "findings": [f.to_json() for f in self.findings],
        }


def default_state_dir() -> Path:
    if os.environ.get("STRAGGLER_STATE_DIR"):
        return Path(os.environ["STRAGGLER_STATE_DIR"])
    system = Path("/var/lib/straggler")
    if os.access(system, os.W_OK) or (not system.exists() and os.access(system.parent, os.W_OK)):
        return system
    return Path.home() / ".cache" / "straggler"


class Gate:
    """One run of the gate. ``on_phase(name)`` is told when a phase starts (the CLI's watchdog
    names the phase the budget ran out in)."""

    def __init__(self, settings: GateSettings, on_phase: Callable[[str], None] | None = None):
        from .probes.devices import host_name
        from .slurm import context

        self.s = settings
        self.on_phase = on_phase or (lambda name: None)
        self.started = time.monotonic()
        self.state_dir = settings.state_dir or default_state_dir()
        self.report = GateReport(host=host_name(), budget_s=settings.budget_s, slurm=context(os.environ))

    def left_s(self) -> float:
        return self.s.budget_s - (time.monotonic() - self.started)

    def run(self) -> GateReport:
        for k in LAUNCHER_VARS:  # the gate measures this node alone, even inside an srun step
            os.environ.pop(k, None)
        kind = self._phase("health", self._health)
        self._phase("reference", self._reference)
        if not self.s.probes:
            self._skip("probes", "no probes asked for")
        elif kind is None:
            self._skip("probes", "no device to probe")
        else:
            res = self._phase("probes", lambda: self._probes(kind))
            if res is not None:
                self._phase("judge", lambda: self._judge(res, kind))
        self.report.elapsed_s = time.monotonic() - self.started
        order = {FAIL: 0, ERROR: 1}
        self.report.findings.sort(key=lambda f: order.get(f.outcome, 2))
        return self.report

    def _phase(self, name: str, fn):
        self.on_phase(name)
        t0 = time.monotonic()
        status = "ok"
        try:
            return fn()
        except _Skipped as e:
            status = f"skipped: {e}"
            return e.result
        finally:
            self.report.phases.append(Phase(name, time.monotonic() - t0, status))

    def _skip(self, name: str, why: str) -> None:
        self.report.phases.append(Phase(name, 0.0, f"skipped: {why}"))

    # ---- health
    def _health(self) -> str | None:
        """NVML health in a child; returns the kind of device to probe (cpu/cuda) or None."""
        from .probes import health

        limit = min(HEALTH_LIMIT_S, max(self.left_s() - JUDGE_RESERVE_S, 0.5))
        cmd = [sys.executable, "-m", "straggler.probes.health", self.s.telemetry, self.s.kernel_log]
        doc: dict[str, Any]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL)
            doc = (
                json.loads(out.stdout.strip().splitlines()[-1])
                if out.stdout.strip()
                else {"error": f"the NVML check exited with code {out.returncode}: {_last_line(out.stderr)}"}
            )
        except subprocess.TimeoutExpired:
            self.report.findings.append(
                Finding(
                    "node",
                    "nvml",
                    f"no answer in {limit:.1f} s",
                    "hang",
                    "an NVML call hung: the check was killed",
                    ERROR,
                )
            )
            return "cuda" if self.s.device == "cuda" else None
        except ValueError:
            doc = {"error": "the NVML check printed no JSON"}
        error = doc.get("error")
        if (
            error
            and self.s.device != "cuda"
            and any(s in error for s in NO_DRIVER)
            and not os.path.exists("/dev/nvidiactl")
        ):
            if self.s.device == "auto" or self.s.device == "cpu":
                raise _Skipped(f"no NVIDIA driver ({error.split(':')[0]}): CPU node", "cpu") from None
        state_file = self.state_dir / "gate-health.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = None
        if doc.get("xid_error"):
            self.report.notes.append(f"XID events not read: {doc['xid_error']}")
        findings, new_state = health.judge(doc, self.s.gpus, state)
        self.report.findings += findings
        if not error:
            write_json(state_file, new_state)
        self.report.devices += [
            f"gpu{r['index']}" for r in doc.get("readings", ()) if self.s.gpus is None or r["index"] in self.s.gpus
        ]
        if self.s.device == "cpu":
            return "cpu"
        if error:
            return None  # NVML missing or broken on a GPU node: nothing to probe with any sense
        return "cuda" if doc.get("count") else ("cpu" if self.s.device == "auto" else None)

    # ---- reference
    def _reference(self) -> None:
        from .reference import fleet_reference

        names = {n for n in (self.s.node, self.report.slurm.get("slurm_node"), self.report.host) if n}
        ref = fleet_reference(
            self.s.collector,
            self.state_dir / "fleet-reference.json",
            min(REFERENCE_LIMIT_S, max(self.left_s() - JUDGE_RESERVE_S, 0.1)),
            self.s.token,
            node=names,
        )
        self.report.reference = ref

    # ---- probes
    def _probes(self, kind: str):
        from .probes.plan import ScanSettings
        from .probes.runner import ScanRounds
        from .remeasure import remeasure

        if kind == "cuda" and self.s.gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.s.gpus))
        probes = tuple(p for p in self.s.probes if kind == "cuda" or p != "pcie")
        deadline = self.left_s() - JUDGE_RESERVE_S
        if deadline <= 1.0:
            self.report.findings.append(
                Finding("node", "budget", f"{self.left_s():.1f} s left", "budget", "no time left to probe", ERROR)
            )
            return None
        settings = ScanSettings(
            probes=probes,
            duration_s=self.s.duration_s or GATE_DURATION_S[kind],
            device=kind,
            samples=self.s.samples,
            deadline_s=deadline,
        )
        rounds = ScanRounds(settings)
        res = remeasure(
            rounds.measure, self._verdicts, probes, self.s.samples, max_rounds=self.s.max_rounds, fits=rounds.fits
        )
        self.report.rounds = res.to_json()
        for f in res.failures:
            hung = "hung" in f["error"] or "deadline" in f["error"]
            self.report.findings.append(
                Finding(
                    _label(f.get("device"), kind, self.s.gpus),
                    "probe",
                    f.get("probe") or "-",
                    "hang" if hung else "error",
                    f["error"],
                    ERROR,
                )
            )
        if not self.report.devices or kind == "cpu":
            self.report.devices = sorted({_label(r.get("gpu"), kind, self.s.gpus, r.get("index")) for r in res.samples})
        return res

    def _verdicts(self, samples: list[dict]) -> list[dict]:
        return analysis_table(samples, self._refs()).to_dict("records") if samples else []

    def _refs(self):
        return self.report.reference.values if self.report.reference else {}

    # ---- judge
    def _judge(self, res, kind: str) -> None:
        ref = self.report.reference
        self.report.findings += judge_samples(
            res.samples, kind, self.s.gpus, self._refs(), ref.source if ref is not None else PEERS
        )


def analysis_table(samples: list[dict], refs) -> pd.DataFrame:
    """The analysis' device table of ``samples``, with the fleet ``refs`` as references (which
    the analysis uses for a device without peers)."""
    from .analysis import analyze
    from .analysis.settings import AnalysisConfig
    from .records import to_frame

    config = AnalysisConfig(references=tuple(f"{k}={v}" for k, v in refs.items()))
    return analyze(to_frame(samples), config=config).devices


def judge_samples(
    samples: list[dict], kind: str, gpus: tuple[int, ...] | None = None, refs=None, source: str = PEERS
) -> list[Finding]:
    """The probes' findings (pure): a straggler is a failure, an undecided device could not be
    decided; then the node against the fleet reference and, on GPUs, PCIe under load."""
    from .errors import StragglerError

    if not samples:
        return []
    refs = refs or {}
    try:
        table = analysis_table(samples, refs)
    except StragglerError as e:
        return [Finding("node", "reference", "none", "no-peers", str(e), ERROR)]
    from straggler.analysis.causes import UNEXPLAINED  # (the analysis ran: pandas is loaded)

    out = []
    for d in table.to_dict("records"):
        dev = _label(d["gpu"], kind, gpus, d.get("index"))
        ratio = d.get("ratio")
        value = f"{ratio:.2f}x" if isinstance(ratio, float) and ratio == ratio else "-"
        if d["verdict"] == "straggler":
            causes = list(d.get("causes") or ())
            cause = causes[0] if causes and causes[0] != UNEXPLAINED else "slow"
            out.append(Finding(dev, d["probe"], value, cause, _short(d.get("evidence"))))
        elif d["verdict"] == "undecided":
            out.append(Finding(dev, d["probe"], value, "undecided", _short(d.get("undecided_reason")), ERROR))
    if source != PEERS:
        out += _against_fleet(table, refs, source)
    if kind == "cuda":
        out += _pcie(samples, gpus)
    return out


def _against_fleet(table, refs, source: str) -> list[Finding]:
    """The node's median per model and probe against the fleet reference: a whole node slower
    than the fleet (every device alike, so its peers cannot see it)."""
    from .analysis.settings import AnalysisConfig

    min_effect = AnalysisConfig().min_effect
    out = []
    for (model, probe, settings), group in table.groupby(["model", "probe", "settings"], dropna=False):
        fleet = refs.get(f"{model}|{probe}|{settings if settings == settings else ''}")
        node = group["value"].median()
        if fleet and node == node and node / fleet < 1 - min_effect:
            out.append(
                Finding(
                    "node", probe, f"{node / fleet:.2f}x", "slow", f"node median against the fleet reference ({source})"
                )
            )
    return out


def _pcie(samples: list[dict], gpus) -> list[Finding]:
    """PCIe generation and width under load (the pcie probe's rows) against their maxima."""
    best: dict[str, tuple] = {}
    for r in samples:
        if not str(r.get("probe", "")).startswith("pcie") or r.get("pcie_gen") is None:
            continue
        dev = _label(r.get("gpu"), "cuda", gpus, r.get("index"))
        cur = (r["pcie_gen"], r.get("pcie_width") or 0)
        seen = best.get(dev, (0, 0))[:2]
        best[dev] = (*max(seen, cur), r.get("pcie_gen_max"), r.get("pcie_width_max"))
    return [
        Finding(
            dev, "pcie", f"gen{gen}x{width}", "pcie", f"link under load gen{gen} x{width} of gen{gen_max} x{width_max}"
        )
        for dev, (gen, width, gen_max, width_max) in sorted(best.items())
        if (gen_max and gen < gen_max) or (width_max and width < width_max)
    ]


class _Skipped(Exception):
    """A phase that does not apply here (the reason is its status; ``result`` what it returns)."""

    def __init__(self, why: str, result=None):
        super().__init__(why)
        self.result = result


def _label(gpu, kind: str, gpus: tuple[int, ...] | None, index=None) -> str:
    """``gpu3`` for a GPU (its index on the node, through CUDA_VISIBLE_DEVICES), ``cpu1`` for a core."""
    if kind == "cuda" and isinstance(index, (int, float)) and index == index:
        i = int(index)
        return f"gpu{gpus[i] if gpus is not None and i < len(gpus) else i}"
    return str(gpu) if gpu else "-"


def _short(text, limit: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(text: str) -> str:
    return next((s.strip() for s in reversed((text or "").splitlines()) if s.strip()), "no output")
