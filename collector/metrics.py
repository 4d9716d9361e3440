"""``/metrics``: the fleet view as a prometheus-client custom collector, plus the collector's own
metrics.

A fleet of 100,000 GPUs is several hundred thousand samples, more than prometheus-client's generic
text writer renders in a second. So each :class:`FleetSnapshot` is turned into exposition text once,
when the analysis publishes it (off the request path); a scrape only appends the probe ages, which
change with the clock. :meth:`FleetCollector.collect` yields the same families for
``registry.get_sample_value`` and the usual client API; a test checks both give identical text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.utils import floatToGoString

from straggler.analysis import bases
from straggler.analysis.causes import NAMES as CAUSE_NAMES, UNEXPLAINED
from straggler.analysis.tiers import CLASSES, TIERS

from .fleet import FleetSnapshot

# The straggler flag's `cause` label takes one of these values (never free text): the analysis'
# first cause when it is one of them (analysis/causes.py NAMES), "other" when it names something
# else, "none" when healthy.
CAUSES = (*CAUSE_NAMES, "other", "none")

# The tier's `verdict` label and the `perf_class` label take the analysis' values only (bounded;
# perf_class "" outside a peer group of 4+).
VERDICTS, PERF_CLASSES = TIERS, CLASSES

PROBE_LABELS = ("host", "uuid", "gpu", "model", "probe", "settings")
DEVICE_LABELS = ("host", "uuid", "gpu", "model")

FAMILIES = {
    "straggler_gpu_performance_ratio": "Device's median over the median of its peers (1 = like its peers; higher is faster).",
    "straggler_gpu_straggler": "1 when the analysis flags the device as a straggler for this probe, else 0; cause names "
    "the first cause, basis what the verdict rests on (analysis/bases.py).",
    "straggler_gpu_cost_ratio": "Slowdown the device imposes on a synchronous job it joins (peer median / its rate - 1).",
    "straggler_gpu_verdict": "1, labelled with the device's verdict tier for this probe (straggler, undecided, slow, "
    "healthy) and its placement class in its peer group (perf_class A fastest quarter .. D).",
    "straggler_gpu_degraded": "1 when the device lost performance against its own past for this probe (only then present).",
    "straggler_fleet_devices_by_verdict": "Devices by their verdict tier (the first of straggler, undecided, slow, healthy among their probes).",
    "straggler_fleet_degraded": "Devices degraded against their own past for at least one probe.",
    "straggler_gpu_last_probe_age_seconds": "Seconds since the device's latest result.",
    "straggler_fleet_devices": "Devices in the fleet view.",
    "straggler_fleet_stragglers": "Devices flagged as stragglers for at least one probe.",
    "straggler_fleet_analysis_timestamp_seconds": "Unix time of the latest fleet analysis.",
    "straggler_gpu_straggler_any": "1 when the device is a straggler for at least one probe, else 0; one series per "
    "device (joins need no max by); cause names the first cause of its costliest probe.",
    "straggler_gpu_flagged_scans": "Consecutive scans of the device (since the collector started) whose analysis "
    "flagged it as a straggler; 0 when the latest did not.",
    "straggler_fleet_job_slowdown_ratio": "Expected slowdown of a synchronous job of job_devices devices drawn at random "
    "from the peer group now (devices=all), and without its stragglers "
    "(devices=without_stragglers); peer groups with a straggler only "
    "(analysis/cost.py job_gain).",
    "straggler_fleet_job_speedup_ratio": "What leaving the stragglers out gains that job: expected step time with every "
    "device over the one without the stragglers, minus 1.",
    "straggler_fleet_min_effect_ratio": "The analysis' min_effect: a device whose deficit to its peers is above it "
    "(ratio below 1 - it) can be flagged (dashboards draw it).",
}
JOB_LABELS = ("model", "probe", "settings")


def cause_label(causes: list[str]) -> str:
    if not causes:
        return UNEXPLAINED
    first = str(causes[0]).split(":")[0].strip().lower()
    return first if first in CAUSES else "other"


def basis_label(basis) -> str:
    """The flag's ``basis`` label: the analysis' basis names (analysis/bases.py, joined by "+"), else "other"."""
    if not basis:
        return bases.NONE
    return basis if all(part in bases.ALL for part in str(basis).split(bases.JOIN)) else "other"


def _escape(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labelstr(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))


@dataclass(frozen=True)
class PreparedFleet:
    """A snapshot's families: (name, [(labels, value)]) with values fixed, and the age family's
    labels with each device's last result time."""

    snapshot: FleetSnapshot
    fixed: tuple[tuple[str, tuple[tuple[dict, float], ...]], ...]
    ages: tuple[tuple[dict, float], ...]
    fixed_text: bytes  # UTF-8, ready to send
    age_prefixes: tuple[str, ...]


def _header(name: str) -> str:
    return f"# HELP {name} {FAMILIES[name]}\n# TYPE {name} gauge\n"


def _any_cause(probes: list[dict]) -> str:
    """The cause label of a device's costliest flagged probe ("none" when none is flagged)."""
    flagged = [p for p in probes if p["straggler"]]
    if not flagged:
        return "none"
    return cause_label(max(flagged, key=lambda p: p["cost"] if p["cost"] is not None else -1.0)["causes"])


def _jobs(summary: dict) -> tuple[list, list]:
    """The analysis' job cost (summary["job_cost"], from analysis/cost.py) as samples; unknown left out."""
    slowdown, speedup = [], []
    for j in summary.get("job_cost") or ():
        labels = {k: str(j.get(k) or "") for k in JOB_LABELS} | {"job_devices": str(j["job_devices"])}
        for devices, key in (("all", "step_time_all"), ("without_stragglers", "step_time_without_stragglers")):
            if j.get(key) is not None:
                slowdown.append(({**labels, "devices": devices}, float(j[key]) - 1.0))
        if j.get("speedup") is not None:
            speedup.append((labels, float(j["speedup"])))
    return slowdown, speedup


def device_key(g: dict) -> tuple[str, str]:
    return g["host"], g["gpu"]


def prepare(snap: FleetSnapshot, streaks: dict[tuple[str, str], tuple[str | None, int]] | None = None) -> PreparedFleet:
    """``streaks``: each flagged device's latest scan and its consecutive flagged scans (FleetCollector.update)."""
    ratio, flag, cost, ages, tier, degraded, flag_any, held = [], [], [], [], [], [], [], []
    for g in snap.gpus:
        dev = {
            "host": g["host"],
            "uuid": g["gpu"],
            "gpu": "" if g["index"] is None else str(g["index"]),
            "model": g["model"] or "",
        }
        if g["last_ts"] is not None:
            ages.append((dev, float(g["last_ts"])))
        if g["probes"]:  # analysed: one probe-free series per device
            flag_any.append(({**dev, "cause": _any_cause(g["probes"])}, 1.0 if g["straggler"] else 0.0))
            held.append((dev, float((streaks or {}).get(device_key(g), (None, 0))[1])))
        for p in g["probes"]:
            labels = {**dev, "probe": p["probe"], "settings": p["settings"] or ""}
            if p["ratio"] is not None:
                ratio.append((labels, float(p["ratio"])))
            cause = cause_label(p["causes"]) if p["straggler"] else "none"
            flag.append(
                ({**labels, "cause": cause, "basis": basis_label(p.get("basis"))}, 1.0 if p["straggler"] else 0.0)
            )
            if p["cost"] is not None:
                cost.append((labels, float(p["cost"])))
            if p.get("verdict") in VERDICTS:  # one series carries tier and class: 100,000 GPUs stay one scrape
                klass = p.get("perf_class") if p.get("perf_class") in PERF_CLASSES else ""
                tier.append(({**labels, "verdict": p["verdict"], "perf_class": klass}, 1.0))
            if p.get("degraded"):
                degraded.append((labels, 1.0))
    by_tier = [g.get("verdict") for g in snap.gpus]
    fixed = [
        ("straggler_gpu_performance_ratio", tuple(ratio)),
        ("straggler_gpu_straggler", tuple(flag)),
        ("straggler_gpu_cost_ratio", tuple(cost)),
        ("straggler_gpu_verdict", tuple(tier)),
        ("straggler_gpu_degraded", tuple(degraded)),
        ("straggler_fleet_devices", (({}, float(len(snap.gpus))),)),
        ("straggler_fleet_stragglers", (({}, float(sum(g["straggler"] for g in snap.gpus))),)),
        ("straggler_fleet_devices_by_verdict", tuple(({"verdict": t}, float(by_tier.count(t))) for t in VERDICTS)),
        ("straggler_fleet_degraded", (({}, float(sum(bool(g.get("degraded")) for g in snap.gpus))),)),
        ("straggler_gpu_straggler_any", tuple(flag_any)),
        ("straggler_gpu_flagged_scans", tuple(held)),
        *zip(
            ("straggler_fleet_job_slowdown_ratio", "straggler_fleet_job_speedup_ratio"),
            map(tuple, _jobs(dict(snap.summary))),
        ),
    ]
    if snap.summary.get("min_effect") is not None:
        fixed.append(("straggler_fleet_min_effect_ratio", (({}, float(snap.summary["min_effect"])),)))
    if snap.computed_ts is not None:
        fixed.append(("straggler_fleet_analysis_timestamp_seconds", (({}, snap.computed_ts),)))
    parts = []
    for name, samples in fixed:
        parts.append(_header(name))
        parts.extend(
            f"{name}{{{_labelstr(lab)}}} {floatToGoString(v)}\n" if lab else f"{name} {floatToGoString(v)}\n"
            for lab, v in samples
        )
    age_name = "straggler_gpu_last_probe_age_seconds"
    return PreparedFleet(
        snapshot=snap,
        fixed=tuple(fixed),
        ages=tuple(ages),
        fixed_text="".join(parts).encode(),
        age_prefixes=tuple(f"{age_name}{{{_labelstr(lab)}}} " for lab, _ in ages),
    )


class FleetCollector:
    """Custom collector over the latest prepared fleet snapshot."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.prepared = prepare(FleetSnapshot())
        # device -> (its latest scan, consecutive scans of it that were flagged)
        self._streaks: dict[tuple[str, str], tuple[str | None, int]] = {}

    def update(self, snap: FleetSnapshot) -> None:
        # A flagged device's streak grows when a new scan of it is flagged again: analyses that only
        # re-read the same scan (results of other devices arrived) add no evidence and do not count,
        # nor does a failed analysis (its snapshot shows the previous verdicts beside newer scans).
        if snap.error is None:
            streaks = {}
            for g in snap.gpus:
                if g["straggler"]:
                    scan, n = self._streaks.get(device_key(g), (None, 0))
                    new_scan = g.get("last_scan_id") != scan or not n
                    streaks[device_key(g)] = (g.get("last_scan_id"), n + 1 if new_scan else n)
            self._streaks = streaks
        self.prepared = prepare(snap, self._streaks)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        prep, now = self.prepared, self.clock()
        for name, samples in prep.fixed:
            fam = GaugeMetricFamily(name, FAMILIES[name], labels=sorted(samples[0][0]) if samples else None)
            for labels, v in samples:
                fam.add_metric([labels[k] for k in sorted(labels)], v)
            yield fam
        fam = GaugeMetricFamily(
            "straggler_gpu_last_probe_age_seconds",
            FAMILIES["straggler_gpu_last_probe_age_seconds"],
            labels=sorted(DEVICE_LABELS),
        )
        for labels, last in prep.ages:
            fam.add_metric([labels[k] for k in sorted(labels)], max(0.0, now - last))  # a clock ahead: 0, not < 0
        yield fam

    def render(self) -> bytes:
        """The same bytes ``generate_latest`` writes for this collector, fast."""
        prep, now = self.prepared, self.clock()
        age = "straggler_gpu_last_probe_age_seconds"
        lines = [f"{p}{floatToGoString(max(0.0, now - last))}\n" for p, (_, last) in zip(prep.age_prefixes, prep.ages)]
        return prep.fixed_text + (_header(age) + "".join(lines)).encode()


class SelfMetrics:
    """The collector's own metrics, in their own registry, every series initialised at start."""

    INGEST_CODES = ("200", "401", "413", "422")

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.results = Counter(
            "straggler_collector_results", "Result rows received, by outcome.", ["outcome"], registry=r
        )
        self.ingest_requests = Counter(
            "straggler_collector_ingest_requests",
            "POST /api/v1/results requests, by status code.",
            ["code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "straggler_collector_request_duration_seconds",
            "HTTP request duration, by route.",
            ["handler"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.analysis_runs = Counter(
            "straggler_collector_analysis_runs", "Fleet analysis runs, by outcome.", ["outcome"], registry=r
        )
        self.analysis_seconds = Gauge(
            "straggler_collector_analysis_duration_seconds", "Duration of the latest fleet analysis.", registry=r
        )
        for outcome in ("accepted", "duplicate"):
            self.results.labels(outcome)
        for code in self.INGEST_CODES:
            self.ingest_requests.labels(code)
        for outcome in ("ok", "error"):
            self.analysis_runs.labels(outcome)

    def analysis_done(self, snap: FleetSnapshot) -> None:
        self.analysis_runs.labels("error" if snap.error else "ok").inc()
        if snap.duration_s is not None:
            self.analysis_seconds.set(snap.duration_s)
