"""Prometheus export: a custom collector over the latest frozen NodeSnapshot, plus the agent's own metrics.

Telemetry families are built from one snapshot per scrape (a device that disappears takes its label
sets with it). Labels: host, gpu (index), uuid, model, pci_bus_id -- nothing unbounded (XID events add their code). A value the
backend could not read is left out, never exported as 0. When a read fails (the snapshot carries an
error and no device), the devices of the last good snapshot stay listed as
``straggler_gpu_up{status="stale"} 0`` with no values, and the snapshot timestamp is that good
read's: nothing old is exported as current. Self metrics start at 0.
"""

from __future__ import annotations

import threading
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from straggler.probes.telemetry import STATUS_OK, THROTTLE_REASONS, NodeSnapshot

from .child import FAILURE_REASONS

LABELS = ("host", "gpu", "uuid", "model", "pci_bus_id")
ERROR_SOURCES = ("telemetry", "upload", "poll", "probe", "spool")
SPOOL_ERRORS = ("full", "corrupt", "other")  # straggler_agent_spool_errors_total{kind}
# why a telemetry read gave no devices: the backend raised / the backend reported an error
TELEMETRY_FAILURES = ("backend_raised", "backend_error")
STATUS_STALE = "stale"  # straggler_gpu_up's status for a device of the last good snapshot
MHZ = 1e6

# (metric name, help, reading field, scale)
GAUGES = (
    ("straggler_gpu_sm_clock_hertz", "SM clock (core clock on a CPU)", "sm_clock_mhz", MHZ),
    ("straggler_gpu_sm_clock_max_hertz", "Maximum SM clock", "sm_clock_max_mhz", MHZ),
    ("straggler_gpu_memory_clock_hertz", "Memory clock", "mem_clock_mhz", MHZ),
    ("straggler_gpu_memory_clock_max_hertz", "Maximum memory clock", "mem_clock_max_mhz", MHZ),
    ("straggler_gpu_power_watts", "Power draw", "power_w", 1.0),
    ("straggler_gpu_power_limit_watts", "Enforced power limit", "power_limit_w", 1.0),
    ("straggler_gpu_temperature_celsius", "Temperature", "temp_c", 1.0),
    ("straggler_gpu_pcie_link_generation", "Current PCIe link generation", "pcie_gen", 1.0),
    ("straggler_gpu_pcie_link_generation_max", "Maximum PCIe link generation", "pcie_gen_max", 1.0),
    ("straggler_gpu_pcie_link_width", "Current PCIe link width (lanes)", "pcie_width", 1.0),
    ("straggler_gpu_pcie_link_width_max", "Maximum PCIe link width (lanes)", "pcie_width_max", 1.0),
    ("straggler_gpu_retired_pages", "Retired memory pages", "retired_pages", 1.0),
    ("straggler_gpu_remapped_rows", "Remapped memory rows", "remapped_rows", 1.0),
    ("straggler_gpu_remapped_rows_pending", "1 while a row remap waits for a GPU reset", "remapped_rows_pending", 1.0),
    (
        "straggler_gpu_remapped_rows_failed",
        "1 when a row remap failed (the GPU needs service)",
        "remapped_rows_failed",
        1.0,
    ),
    ("straggler_gpu_utilization_ratio", "Utilization (0-1)", "util_pct", 0.01),
    ("straggler_gpu_memory_utilization_ratio", "Memory controller utilization (0-1)", "mem_util_pct", 0.01),
    ("straggler_gpu_memory_used_bytes", "Device memory used", "mem_used_bytes", 1.0),
    ("straggler_gpu_memory_total_bytes", "Device memory size", "mem_total_bytes", 1.0),
    ("straggler_gpu_compute_processes", "Running compute processes", "processes", 1.0),
)


class SnapshotCollector:
    """Yields metric families from the latest snapshot (set by the agent once per tick)."""

    def __init__(self) -> None:
        self._snapshot: NodeSnapshot | None = None
        self._last_good: NodeSnapshot | None = None  # the last snapshot that read the devices
        self._lock = threading.Lock()

    def update(self, snapshot: NodeSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            if snapshot.error is None:
                self._last_good = snapshot

    @property
    def snapshot(self) -> NodeSnapshot | None:
        return self._snapshot

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; don't collect at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snap, good = self._snapshot, self._last_good
        if snap is None:
            return
        backend = GaugeMetricFamily(
            "straggler_telemetry_backend_up", "1 when the telemetry backend read the node", labels=["host", "backend"]
        )
        backend.add_metric([snap.host, snap.backend], 0.0 if snap.error else 1.0)
        yield backend
        stale = snap.error is not None and not snap.devices and good is not None
        ts = GaugeMetricFamily(
            "straggler_telemetry_snapshot_timestamp_seconds", "When the exported device data was read", labels=["host"]
        )
        if snap.error is None or stale:
            ts.add_metric([snap.host], good.ts if stale else snap.ts)
        yield ts
        up = GaugeMetricFamily(
            "straggler_gpu_up",
            "1 when the device was read, 0 when lost, unreadable or stale",
            labels=list(LABELS) + ["status"],
        )
        if stale:
            for d in good.devices:
                up.add_metric(
                    [snap.host, str(d.index), d.uuid or "", d.model or "", d.pci_bus_id or "", STATUS_STALE], 0.0
                )
            yield up
            return
        info = GaugeMetricFamily("straggler_gpu_info", "Device identity", labels=list(LABELS) + ["driver"])
        gauges = {name: GaugeMetricFamily(name, doc, labels=list(LABELS)) for name, doc, _, _ in GAUGES}
        events = GaugeMetricFamily(
            "straggler_gpu_clock_event_active",
            "1 while the clock-event (throttle) reason is active",
            labels=list(LABELS) + ["reason"],
        )
        ecc = CounterMetricFamily("straggler_gpu_ecc_errors", "ECC errors (aggregate)", labels=list(LABELS) + ["type"])
        # xid: NVML's XID code (a number from NVIDIA's short, fixed list), never free text
        xid = CounterMetricFamily(
            "straggler_gpu_xid_errors", "XID events since the agent started, by XID code", labels=list(LABELS) + ["xid"]
        )
        for d in snap.devices:
            labels = [snap.host, str(d.index), d.uuid or "", d.model or "", d.pci_bus_id or ""]
            up.add_metric(labels + [d.status], 1.0 if d.status == STATUS_OK else 0.0)
            info.add_metric(labels + [d.driver or ""], 1.0)
            for name, _, field, scale in GAUGES:
                value = getattr(d, field)
                if value is not None:
                    gauges[name].add_metric(labels, float(value) * scale)
            if d.throttle_reasons is not None:
                for reason in THROTTLE_REASONS:
                    events.add_metric(labels + [reason], 1.0 if reason in d.throttle_reasons else 0.0)
            for kind, value in (("corrected", d.ecc_corrected_total), ("uncorrected", d.ecc_uncorrected_total)):
                if value is not None:
                    ecc.add_metric(labels + [kind], float(value))
            for code, count in sorted((d.xid_errors or {}).items()):
                xid.add_metric(labels + [str(code)], float(count))
        yield up
        yield info
        yield from gauges.values()
        yield events
        yield ecc
        yield xid


class SelfMetrics:
    """The agent measuring itself; every series exists (at 0) from the start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ticks = Counter("straggler_agent_ticks", "Telemetry ticks", registry=registry)
        self.tick_seconds = Gauge(
            "straggler_agent_tick_duration_seconds", "Duration of the last tick", registry=registry
        )
        self.errors = Counter("straggler_agent_errors", "Errors by source", ["source"], registry=registry)
        for source in ERROR_SOURCES:
            self.errors.labels(source)
        self.probe_runs = Counter("straggler_agent_probe_runs", "Probe runs started", registry=registry)
        self.probe_failures = Counter(
            "straggler_agent_probe_failures", "Probe runs that failed, by reason", ["reason"], registry=registry
        )
        for reason in FAILURE_REASONS:
            self.probe_failures.labels(reason)
        self.probe_seconds = Gauge(
            "straggler_agent_probe_duration_seconds", "Duration of the last probe run", registry=registry
        )
        self.uploaded = Counter(
            "straggler_agent_uploaded_results", "Results accepted by the collector", registry=registry
        )
        self.spooled = Gauge("straggler_agent_spool_results", "Results waiting in the spool", registry=registry)
        self.spool_errors = Counter(
            "straggler_agent_spool_errors",
            "Spool failures, by kind (full disk, corrupt file)",
            ["kind"],
            registry=registry,
        )
        for kind in SPOOL_ERRORS:
            self.spool_errors.labels(kind)
        self.spool_dropped = Counter(
            "straggler_agent_spool_dropped_results",
            "Oldest results dropped because the spool reached its cap",
            registry=registry,
        )
        self.telemetry_failures = Counter(
            "straggler_agent_telemetry_failures",
            "Telemetry reads that gave no devices, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in TELEMETRY_FAILURES:
            self.telemetry_failures.labels(reason)
        self.idle = Gauge(
            "straggler_agent_devices_idle", "1 when every device has been idle for the grace period", registry=registry
        )


def build_registry() -> tuple[CollectorRegistry, SnapshotCollector, SelfMetrics]:
    registry = CollectorRegistry(auto_describe=False)
    snapshots = SnapshotCollector()
    registry.register(snapshots)
    return registry, snapshots, SelfMetrics(registry)
