"""What a scan will run, decided before any worker starts: pure data and checks, no process.

``ScanSettings`` (what the caller asked), ``ScanResult`` (what came back), the default probe
durations, scan ids, and :func:`worker_plan`: the one place that turns settings and a resolved
device plan into the :class:`WorkerPlan` every worker runs, after checking the settings and the
telemetry spec. The local runner (:mod:`.runner`) and a torchrun/srun rank (:mod:`.distributed`)
both import this module; neither imports the other at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from straggler.errors import InputError
from straggler.scanproto import new_scan_id

from .budget import GRACE_S
from .devices import DEVICE_CHOICES, PROBES

DEFAULT_DURATION_S = {"cpu": 4.0, "cuda": 15.0}  # per probe


@dataclass(frozen=True)
class ScanSettings:
    probes: tuple[str, ...] = PROBES
    duration_s: float | None = None  # per probe; None: 4 s on CPU cores, 15 s on GPUs
    device: str = "auto"
    scan_id: str | None = None
    start_at: float | None = None  # Unix time of the first probe barrier
    deadline_s: float | None = None  # whole scan; None: derived from the plan
    samples: int = 5  # windows (samples) per device and probe
    telemetry: str = "auto"
    grace_s: float = GRACE_S  # a probe phase may last 2 x duration + grace before its worker is killed

    def problems(self) -> list[str]:
        numbers = (("start-at", self.start_at), ("duration", self.duration_s), ("deadline", self.deadline_s))
        out = [
            f"--{k} must be a finite number, got {v}" for k, v in numbers if v is not None and not abs(v) < float("inf")
        ]
        if self.duration_s is not None and not self.duration_s > 0:
            out.append(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            out.append(f"--deadline must be > 0 seconds, got {self.deadline_s}")
        if self.device not in DEVICE_CHOICES:
            out.append(f"unknown device {self.device!r}; choose from {', '.join(DEVICE_CHOICES)}")
        if self.samples < 1:
            out.append(f"samples must be >= 1, got {self.samples}")
        return out


@dataclass
class ScanResult:
    scan_id: str
    host: str
    backend: str  # "cpu" or "cuda"
    notice: str  # which backend ran and why, one line
    samples: list[dict] = field(default_factory=list)  # canonical rows
    failures: list[dict] = field(default_factory=list)  # {"host", "device", "rank", "probe", "error"}
    devices: list[dict] = field(default_factory=list)  # {"host", "gpu", "index", "model", "rank"}
    root: bool = True  # False on the non-zero ranks of a torchrun/srun scan (they report nothing)
    duration_s: float | None = None  # per probe, as run


@dataclass(frozen=True)
class WorkerPlan:
    scan_id: str
    host: str
    kind: str  # "cpu" | "cuda"
    probes: tuple[str, ...]
    duration_s: float  # per probe
    n_windows: int  # samples per device per probe
    telemetry: str = "auto"  # open_backend spec
    interval_s: float = 0.1
    start_at: float | None = None  # wall-clock instant of the first probe barrier
    group_timeout_s: float = 120.0


def check_settings(settings: ScanSettings) -> None:
    problems = settings.problems()
    if problems:
        raise InputError("; ".join(problems))


def check_telemetry(spec: str) -> None:
    """A bad telemetry spec or fixture is one InputError now, before any worker starts."""
    from .backends import open_backend

    open_backend(spec).close()


def worker_plan(settings: ScanSettings, host: str, kind: str, probes: tuple[str, ...]) -> WorkerPlan:
    """The plan every worker of this scan runs on a ``kind`` device (``"cpu"`` or ``"cuda"``) of
    ``host``: the settings' probes as :func:`.devices.plan_probes` kept them, the default duration
    of that kind unless the settings name one, a new scan id unless they name one. Refuses a bad
    telemetry spec first (InputError), so a scan never starts workers that cannot read it."""
    check_telemetry(settings.telemetry)
    duration = settings.duration_s or DEFAULT_DURATION_S[kind]
    return WorkerPlan(
        scan_id=settings.scan_id or new_scan_id(host),
        host=host,
        kind=kind,
        probes=probes,
        duration_s=duration,
        n_windows=settings.samples,
        telemetry=settings.telemetry,
        start_at=settings.start_at,
        group_timeout_s=2 * duration + 3 * settings.grace_s,
    )
